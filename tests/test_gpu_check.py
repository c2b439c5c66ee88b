"""``python -m bench.gpu_check`` (the CUDA check of ./run.sh gpu-check): its CPU dry run under
the interpreter, the one-line error without CUDA, the recording of failing checks, and the
finder that lets a source checkout run it without ``pip install``."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import isreshape_triton as irt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import SourceTreeFinder  # noqa: E402
from bench import gpu_check  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")


def test_dry_run_passes_and_writes_the_report(tmp_path):
    """The whole script on the CPU at tiny shapes: exit 0, every check passed or (CUDA graphs)
    skipped, every implementation timed once, the JSON / markdown (and PNG) written."""
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"schema", "environment", "summary", "checks", "timings", "notes", "tolerances", "wall_s"} <= set(report)
    assert {"torch", "triton", "cuda", "gpu", "device", "dry_run"} <= set(report["environment"])
    assert report["environment"]["dry_run"] and report["summary"]["ok"]
    checks = report["checks"]
    bad = [c for c in checks if c["status"] not in ("pass", "skipped")]
    assert not bad, bad
    assert all(c["group"] == "cuda_graph" and c["detail"] == "no CUDA" for c in checks if c["status"] == "skipped")
    groups = [c["group"] for c in checks]
    assert groups.count("policy_loss") == len(irt.LOSS_TYPES) * len(irt.AGG_MODES)  # fp32 (the full run: bf16 too)
    assert {"packed", "from_logits", "sampling", "cuda_graph", "repeatable", "compile"} <= set(groups)
    assert all(c["max_abs_err"] is not None and c["tol_ratio"] <= 1.0 for c in checks if c["status"] == "pass")
    timed = {t["impl"] for t in report["timings"] if t["us"] is not None}
    try:
        import liger_kernel  # noqa: F401
        liger = {"liger"}
    except ImportError:
        liger = set()
    assert {"fused", "eager", "compiled"} | liger <= timed
    assert report["wall_s"] < 180
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Correctness" in md and "## Timings" in md and "OK" in md
    assert (tmp_path / "gpu_check.png").exists() or any("matplotlib" in n for n in report["notes"])


@no_cuda
@pytest.mark.parametrize("argv", [["--device", "cuda"], []], ids=["device_cuda", "full_run"])
def test_without_cuda_one_line_error(argv, tmp_path, capsys):
    assert gpu_check.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--dry-run" in err
    assert not list(tmp_path.iterdir())


def test_a_failing_check_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    """A failing and a raising check do not stop the run; the exit status is 1."""
    def plan(s):
        def fail():
            return [gpu_check.close("x", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1]), 1e-5, 1e-5)]

        def boom():
            raise RuntimeError("boom")

        return [("demo", "fails", fail), ("demo", "raises", boom),
                ("demo", "passes", lambda: [gpu_check.bitwise("y", torch.ones(3), torch.ones(3))])]

    monkeypatch.setattr(gpu_check, "correctness_plan", plan)
    monkeypatch.setattr(gpu_check, "run_timings", lambda s, deadline: [])
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert [c["status"] for c in checks] == ["fail", "error", "pass"]
    assert checks[0]["worst"] == "x" and abs(checks[0]["max_abs_err"] - 0.1) < 1e-6 and checks[0]["tol_ratio"] > 1
    assert "RuntimeError: boom" in checks[1]["detail"]


def test_comparisons():
    nan, inf = float("nan"), float("inf")
    assert gpu_check.close("a", torch.tensor([1.0, nan, inf]), torch.tensor([1.0, nan, inf]), 0, 0).ratio == 0
    assert gpu_check.close("a", torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan]), 1, 1).ratio == inf
    assert gpu_check.close("a", torch.zeros(2), torch.zeros(3), 1, 1).ratio == inf
    assert gpu_check.bitwise("b", torch.tensor([nan]), torch.tensor([nan])).ratio == 0
    assert gpu_check.bitwise("b", torch.tensor([0.0]), torch.tensor([-0.0])).ratio == inf  # bits, not values
    assert gpu_check.bitwise("b", torch.ones(2), torch.ones(2, dtype=torch.float64)).ratio == inf


def test_warm_shard_runs_its_share():
    """A warm-up worker (``--warm-shard i/n``, spawned by ``prewarm`` on CUDA) runs every n-th item."""
    s = gpu_check.make_settings(True, "cpu", None)
    n_items = len(gpu_check.warm_items(s))
    assert n_items > len(irt.LOSS_TYPES) * len(irt.AGG_MODES)
    assert gpu_check.warm_shard(s, 3, n_items - 2) == 1
    assert gpu_check.main(["--dry-run", "--warm-shard", f"0/{n_items}"]) == 0


# ----------------------------------------------------------------------------- source checkout

def test_source_tree_finder_maps_the_kernels_directory(tmp_path):
    finder = SourceTreeFinder(ROOT)
    package = os.path.join(ROOT, "isreshape_triton")
    spec = finder.find_spec("isreshape_triton.kernels", [package])
    assert spec.origin == os.path.join(ROOT, "kernels", "__init__.py")
    assert list(spec.submodule_search_locations) == [os.path.join(ROOT, "kernels")]
    assert finder.find_spec("isreshape_triton", None).origin == os.path.join(package, "__init__.py")
    assert finder.find_spec("isreshape_triton.kernels", [str(tmp_path)]) is None  # another copy's package
    assert finder.find_spec("isreshape_triton.ops", [package]) is None  # the path finder's job
    assert SourceTreeFinder(str(tmp_path)).find_spec("isreshape_triton.kernels", None) is None  # no tree there


def test_source_checkout_imports_the_kernels_without_install(tmp_path):
    """A copy of the tree, with the virtualenv's editable finder removed (as on a machine where
    the package was never installed): ``import isreshape_triton.kernels`` fails on its own and
    works once ``bench`` is imported, from the copy's ``kernels/``."""
    for name in ("isreshape_triton", "kernels", "bench"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    probe = textwrap.dedent("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        if sys.argv[1] == "with_bench":
            import bench
        import isreshape_triton.kernels.loss as loss
        import isreshape_triton
        print(loss.__file__)
        print(isreshape_triton.__file__)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}

    def run(mode):
        return subprocess.run([sys.executable, "-c", probe, mode], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    without = run("without_bench")
    assert without.returncode != 0 and "No module named 'isreshape_triton.kernels'" in without.stderr
    with_bench = run("with_bench")
    assert with_bench.returncode == 0, with_bench.stderr
    kernels_file, package_file = with_bench.stdout.split()
    assert kernels_file == str(tmp_path / "kernels" / "loss.py")
    assert package_file == str(tmp_path / "isreshape_triton" / "__init__.py")
