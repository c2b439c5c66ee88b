"""The family architecture (issue 18): a family is its module in ``isreshape_triton/families/``
and its device module in ``kernels/families/``; every table derives from the declarations, and
the shared code (kernels, op, reference, metrics) never names a family."""
import ast
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import isreshape_triton as irt
from isreshape_triton import reference
from isreshape_triton.families import FAMILIES, kernel_family
from isreshape_triton.family import GAMMA_MODES, Family
from isreshape_triton.kernels import layout
from isreshape_triton.metrics import COMMON, GAMMA_STATS, metric_names

ROOT = Path(__file__).resolve().parent.parent
NAMES = tuple(FAMILIES)


def test_the_registry_is_the_family_modules():
    modules = sorted(p.stem for p in (ROOT / "isreshape_triton" / "families").glob("*.py") if p.stem != "__init__")
    assert list(NAMES) == modules and irt.LOSS_TYPES == NAMES
    for name, family in FAMILIES.items():
        assert isinstance(family, Family) and family.name == name


@pytest.mark.parametrize("name", NAMES)
def test_a_family_declares_everything_the_package_derives(name):
    family = FAMILIES[name]
    assert dataclasses.is_dataclass(family.params) and family.params.__dataclass_params__.frozen
    params = irt.make_params(name)
    assert type(params) is family.params and getattr(irt, family.params.__name__) is family.params
    assert getattr(reference, name) is family.reference is reference.FAMILIES[name]
    assert metric_names(name) == (COMMON + (GAMMA_STATS if family.gamma_stats else ()) + family.metrics
                                  + family.extra_metrics)
    assert set(metric_names(name)) - set(family.extra_metrics) <= set(layout.METRIC_SLOTS), "not in the kernels"
    assert len(family.extra_metrics) <= next(f.width for f in layout.PARTIAL_FIELDS if f.name == "extras")
    kernel = kernel_family(name, params)
    assert kernel.name == name and kernel.gamma_mode in GAMMA_MODES
    assert ((kernel.gamma_stats, kernel.row_weight, kernel.rollout_in_row)
            == (family.gamma_stats, family.row_weight, family.rollout_in_row))
    assert family.row_weight or not family.rollout_in_row
    assert kernel.extra_terms >= len(family.extra_metrics)
    device = importlib.import_module(f"isreshape_triton.kernels.families.{name}")
    assert callable(device.token) and hasattr(device, "row_weight") == family.row_weight


def _family_mentions(path: Path) -> list:
    """Identifiers and string constants naming a family (a default argument value aside)."""
    tree = ast.parse(path.read_text())
    defaults = {id(d) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for d in f.args.defaults + f.args.kw_defaults if d is not None}
    hits = []
    for node in ast.walk(tree):
        word = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.value if isinstance(node, ast.Constant) and id(node) not in defaults else None)
        if isinstance(word, str) and word.lower() in NAMES:
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno} {word}")
    return hits


def test_the_shared_code_never_names_a_family():
    """No family id, name test or special case in the kernels, the op, the reference or the metrics
    (the adapters and the development tooling aside)."""
    own = ("families", "integrations", "dev")
    shared = [p for p in (ROOT / "isreshape_triton").rglob("*.py")
              if not set(p.relative_to(ROOT / "isreshape_triton").parts[:-1]) & set(own)]
    shared += sorted((ROOT / "kernels").glob("*.py"))
    assert not [hit for path in shared for hit in _family_mentions(path)]


def test_setup_installs_every_package():
    """A wheel holds every package of the tree (the family modules and their device modules too)."""
    setup = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    declared = set(ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages")))
    tree = {".".join(("isreshape_triton",) + p.parent.relative_to(ROOT / "isreshape_triton").parts)
            for p in (ROOT / "isreshape_triton").rglob("__init__.py")}
    tree |= {".".join(("isreshape_triton", "kernels") + p.parent.relative_to(ROOT / "kernels").parts)
             for p in (ROOT / "kernels").rglob("__init__.py")}
    assert declared == tree


TOY_FAMILY = '''"""toy_pg: an importance-weighted policy gradient, loss = −s·A·(w − 1) (a test family)."""
from dataclasses import dataclass

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, ones_like


@dataclass(frozen=True)
class ToyPGParams(Options):
    scale: float = 1.0

    def __post_init__(self):
        set_real(self, "scale", lo=0.0, lo_open=True)


def toy_pg(ell, adv, *, params):
    w = torch.exp(ell)
    above = (w.detach() > 1.0).to(ell.dtype)
    return TokenTerms(params.scale * adv * w.detach(), params.scale * adv * torch.expm1(ell), ones_like(ell),
                      {"w_above_one": above})


FAMILY = Family("toy_pg", ToyPGParams, toy_pg, lambda p: KernelFamily(floats(p.scale)),
                extra_metrics=("w_above_one",))
'''
TOY_DEVICE = '''"""toy_pg's φ and F."""
import triton
import triton.language as tl

from ..common import expm1


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    (scale,) = params
    zero = tl.zeros_like(ell)
    return scale * A * w, scale * A * expm1(ell), 1.0 + zero, (tl.where(w > 1.0, 1.0, 0.0), zero, zero, zero, zero)
'''
TOY_RUN = """
import torch
import isreshape_triton as irt
assert "toy_pg" in irt.LOSS_TYPES and irt.ToyPGParams().scale == 1.0
g = torch.Generator().manual_seed(0)
lp = (-torch.rand(3, 40, generator=g, dtype=torch.float64)).requires_grad_()
olp = lp.detach() + 0.3 * torch.randn(3, 40, generator=g, dtype=torch.float64)
adv, mask = torch.randn(3, 40, generator=g, dtype=torch.float64), torch.rand(3, 40, generator=g) > 0.2
for agg in ("token-mean", "seq-mean-token-mean"):
    for run in (irt.policy_loss, irt.reference.policy_loss):
        loss, metrics = run(lp, olp, adv, mask, "toy_pg", agg, scale=0.5)
        grad, = torch.autograd.grad(loss, lp)
        if run is irt.policy_loss:
            want = (loss, metrics, grad)
    torch.testing.assert_close(want[0], loss)
    torch.testing.assert_close(want[2], grad)
    assert list(want[1]) == list(metrics) and metrics["w_above_one"] > 0
    for k in metrics:
        torch.testing.assert_close(want[1][k], metrics[k])
print("OK", irt.uses_kernels(lp))
"""


def test_a_new_family_is_two_files(tmp_path):
    """A family written as its two files (its module and its device module) is a loss type of
    every path, kernels and reference alike, with its extra metric, and nothing else changes."""
    package = tmp_path / "isreshape_triton"
    shutil.copytree(ROOT / "isreshape_triton", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", package / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (package / "families" / "toy_pg.py").write_text(TOY_FAMILY)
    (package / "kernels" / "families" / "toy_pg.py").write_text(TOY_DEVICE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", TOY_RUN], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.split() == ["OK", "True"], out.stdout + out.stderr
