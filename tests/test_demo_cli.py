"""The newcomer's path: the demo's command line and the README.

- ``python -m bench --device cuda`` / ``python -m bench.demo_rl --device cuda`` on a machine
  where torch sees no GPU: a one-line error and exit code 2, no traceback;
- the demo writes to an untracked folder by default (the committed figures in bench/results
  are rewritten only with ``--out bench/results``);
- every path README.md names exists, README.md stays short, and its quick-start runs.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NO_CUDA = "no CUDA device is visible to torch (torch.cuda.is_available() is False); use --device cpu"
# folders that the README's commands create (ignored by git): named so that users find their output
GENERATED = ("bench/out", "bench/results/gpu", ".triton-oldest")  # made by run.sh or the bench

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")


def _run(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # also hides a GPU, so the error path runs everywhere
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("module", ["bench", "bench.demo_rl"])
def test_device_cuda_without_cuda_is_a_one_line_error(module):
    proc = _run("-m", module, "--device", "cuda")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--device cuda: " + NO_CUDA in errors[0], proc.stderr
    assert proc.stdout == ""


def test_bench_default_output_is_untracked():
    from bench import __main__ as cli

    out = pathlib.Path(cli.DEFAULT_OUT).resolve()
    assert out == ROOT / "bench" / "out"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "bench/out/" in ignored
    proc = _run("-m", "bench", "--help")
    assert proc.returncode == 0 and "--out bench/results" in " ".join(proc.stdout.split())


def test_demo_rl_default_output_is_untracked():
    from bench import demo_rl

    cfg = demo_rl.parse([])
    assert pathlib.Path(cfg.out).resolve() == ROOT / "bench" / "out"


def _prose(text):
    """README text without fenced code blocks (shell/python there is not a path list)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def named_paths(text):
    """Repository paths a markdown text names: markdown link targets and backticked words that
    look like paths (a slash or a file extension). URLs, anchors and pytest node ids are cut."""
    prose = _prose(text)
    found = set()
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            found.add(target.split("#", 1)[0])
    for word in re.findall(r"`([^`\s]+)`", prose):
        word = word.split("::", 1)[0]
        if re.match(r"[a-z]+:", word) or word.startswith(("-", "$")):
            continue
        if "/" in word or re.search(r"\.(py|md|txt|json|png|sh|ini|cfg|toml|yaml|yml)$", word):
            found.add(word)
    return {p for p in found if p}


def test_readme_paths_exist():
    text = README.read_text()
    assert "../shared" not in text  # a clone has no ../shared (the spec's user-facing part is docs/contract.md)
    paths = named_paths(text)
    assert "docs/contract.md" in paths and "LICENSE" in paths  # the extraction finds links
    missing = sorted(p for p in paths
                     if not (ROOT / p).exists() and not any(p.rstrip("/") == g or p.startswith(g + "/") for g in GENERATED))
    assert not missing, f"README.md names paths that are not in the repository: {missing}"


def test_docs_links_resolve():
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        assert "../shared" not in text, page.name
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            assert (page.parent / target.split("#", 1)[0]).exists(), f"{page.name}: {target}"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    first_block = re.search(r"```\w*\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["./run.sh demo", "./run.sh test"]


def test_readme_quickstart():
    """The README's quick start runs as written (here on the kernel path: conftest sets
    TRITON_INTERPRET=1) and agrees with the reference."""
    import isreshape_triton as irt

    marker = "<!-- tested: tests/test_demo_cli.py::test_readme_quickstart -->"
    text = README.read_text()
    assert marker in text
    code = re.search(r"```python\n(.*?)```", text.split(marker, 1)[1], re.S).group(1)
    scope = {}
    exec(code, scope)
    lp = scope["log_prob"].detach().clone().requires_grad_()
    ref_loss, ref_metrics = irt.reference.policy_loss(lp, scope["old_log_prob"], scope["advantages"],
                                                      scope["response_mask"], loss_type="is_reshape",
                                                      loss_agg_mode="token-mean", gamma="ess", rho_min=0.3)
    ref_loss.backward()
    torch.testing.assert_close(scope["loss"].detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scope["log_prob"].grad, lp.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scope["metrics"]["gamma"], ref_metrics["gamma"], rtol=1e-5, atol=1e-6)
