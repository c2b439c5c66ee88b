"""Importing the package (issue 16), each in a fresh process:

* ``import isreshape_triton`` costs at most 0.5 s beyond ``import torch``: it imports
  neither ``torch._dynamo`` (the torch.compile boundary is made where Dynamo traces it,
  boundary.py) nor triton nor ``torch._inductor``;
* a function that calls ``irt.policy_loss`` compiles with ``fullgraph=True`` (no graph break)
  before the op ever ran eagerly, and matches the eager result;
* ``TRITON_INTERPRET=1`` set after triton was imported is a one-line RuntimeError saying it
  must be set before anything imports triton (not an error from deep inside Triton); set
  before, also after ``import isreshape_triton``, it runs the interpreter;
* the product's import graph (every import, at module level or inside a function, and the
  imports by name of the family modules) has no cycle between its modules, and none of its modules imports the development tooling
  (``isreshape_triton.dev``: AOT and SASS, profiler, interpreter shim).
"""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

IMPORT_BUDGET_S = 0.5


def _python(code: str, interpret=True, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_import_overhead_beyond_torch():
    code = """
        import time
        import torch
        t = time.perf_counter()
        import isreshape_triton
        print(time.perf_counter() - t)
    """
    times = [float(_ok(_python(code)).split()[-1]) for _ in range(3)]
    assert min(times) <= IMPORT_BUDGET_S, f"import isreshape_triton took {times} s beyond import torch"


def test_import_loads_no_heavy_module():
    out = _ok(_python("""
        import sys
        import isreshape_triton
        print([m for m in ("torch._dynamo", "torch._inductor", "triton") if m in sys.modules])
    """))
    assert out.split("\n")[-2] == "[]", f"import isreshape_triton imported {out}"


@pytest.mark.parametrize("interpret", [True, False], ids=["kernels", "reference"])
def test_compile_before_any_eager_call(interpret):
    """A fresh process whose first policy_loss call is traced by Dynamo: one graph, no graph
    break, the eager loss and gradient; a family module too."""
    out = _ok(_python("""
        import sys
        import torch
        import isreshape_triton as irt
        assert "torch._dynamo" not in sys.modules

        g = torch.Generator().manual_seed(0)
        lp = -torch.rand(3, 9, generator=g)
        olp = lp + 0.3 * torch.randn(3, 9, generator=g)
        adv, mask = torch.randn(3, generator=g), torch.rand(3, 9, generator=g) > 0.2
        module = irt.PolicyLoss("ppo_clip", "seq-mean-token-mean")

        def step(x, beta):
            loss, metrics = irt.policy_loss(x, olp, adv, mask, "is_reshape_sign", ref_log_prob=olp - 0.1,
                                            kl_coef=beta)
            return loss + module(x, olp, adv, mask)[0], metrics["gamma_pos"]

        from torch._dynamo.utils import counters
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        got, want = [], []
        for fn, out in ((compiled, got), (step, want)):
            x = lp.clone().requires_grad_()
            loss, gamma = fn(x, 0.05)
            loss.backward()
            out += [loss.detach(), gamma, x.grad]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
        print("OK")
    """, interpret=interpret))
    assert out.split()[-1] == "OK"


_LATE_INTERPRET = """
    import os
    import torch
    {before}
    os.environ["TRITON_INTERPRET"] = "1"
    import isreshape_triton as irt
    lp, olp = torch.zeros(2, 5, requires_grad=True), torch.full((2, 5), -0.1)
    for call in {calls!r}:
        try:
            eval(call)
        except RuntimeError as e:
            print("RuntimeError:", e)
        else:
            print("OK")
"""
_CALLS = [
    "irt.policy_loss(lp, olp, torch.ones(2))[0].backward()",
    "irt.policy_loss_from_logits(torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), olp, torch.ones(2))",
    "irt.optimal_sampling(torch.randn(2, 7), torch.randn(2, 7))",
]


@pytest.mark.parametrize("before", ["import triton", "import isreshape_triton.ops", "import torch._dynamo"])
def test_interpret_set_after_triton_import_is_a_clear_error(before):
    """Every kernel entry point (log-probs, logits, sampling): one line, saying what to do."""
    out = _ok(_python(_LATE_INTERPRET.format(before=before, calls=_CALLS), interpret=False))
    lines = out.strip().split("\n")
    assert len(lines) == len(_CALLS), out
    for line in lines:
        assert line.startswith("RuntimeError: TRITON_INTERPRET=1 was set after triton was imported"), line
        assert "before anything imports triton" in line


@pytest.mark.parametrize("before", ["", "import isreshape_triton"])
def test_interpret_set_before_triton_import_runs_the_interpreter(before):
    """Setting it after importing the package is fine (the package does not import triton)."""
    out = _ok(_python(_LATE_INTERPRET.format(before=before, calls=_CALLS[:1]) + """
    import sys
    print(type(sys.modules["isreshape_triton.kernels.loss"].token_loss_kernel).__name__)
    """, interpret=False))
    assert out.split() == ["OK", "InterpretedFunction"]


# ----------------------------------------------------------------------------- the import graph
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "isreshape_triton"
DEV = f"{PACKAGE}.dev"


def _modules() -> dict:
    """{module name: source path} of the installed layout (``kernels/`` is ``isreshape_triton.kernels``)."""
    out = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix] + parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """The modules of the package that ``name`` imports (a package's ``__init__`` aside: importing
    any submodule runs it, so it is no edge)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name and not (modules[t].name == "__init__.py"
                                                                              and name.startswith(t + "."))}
    return found


def _graph() -> dict:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # the imports by name (importlib): the family registry imports every family module, the
    # launch planning every family's device module
    for name in modules:
        if name.startswith(f"{PACKAGE}.families."):
            graph[f"{PACKAGE}.families"].add(name)
        if name.startswith(f"{PACKAGE}.kernels.families."):
            graph[f"{PACKAGE}.ops"].add(name)
    return graph


def test_the_product_never_imports_the_dev_tooling():
    graph = _graph()
    bad = {name: sorted(t for t in targets if t == DEV or t.startswith(DEV + "."))
           for name, targets in graph.items() if not (name == DEV or name.startswith(DEV + "."))}
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_cycles():
    graph = {name: {t for t in targets if t != PACKAGE} for name, targets in _graph().items() if name != PACKAGE}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" → ".join(c) for c in cycles)
