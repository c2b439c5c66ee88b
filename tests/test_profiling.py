"""The work counters themselves (isreshape_triton.dev.profiling): known snippets, known counts."""
import json
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

from isreshape_triton.dev.profiling import OpCounter, count_work, tensor_bytes

N = 1000


def _pair():
    return torch.randn(N), torch.randn(N)


def test_binary_op_is_one_launch_and_counts_inputs_and_output():
    a, b = _pair()
    with OpCounter() as c:
        a + b
    assert (c.launches, c.bytes, c.syncs, c.allocs) == (1, 3 * N * 4, 0, 0)
    assert c.ops == ["aten::add.Tensor"]


def test_inplace_op_counts_read_and_write():
    a, b = _pair()
    with OpCounter() as c:
        a.add_(b)
    assert (c.launches, c.bytes) == (1, 3 * N * 4)


def test_item_is_a_sync():
    x = torch.randn(N)
    with OpCounter() as c:
        x.sum().item()
    assert (c.launches, c.syncs) == (2, 1)
    assert c.sync_ops == ["aten::_local_scalar_dense"]
    assert c.bytes == N * 4 + 4 + 4  # sum: in + out; item: in


@pytest.mark.parametrize("snippet", [
    lambda x, m: x[m],
    lambda x, m: x.masked_select(m),
    lambda x, m: m.nonzero(),
    lambda x, m: torch.unique(m),
    lambda x, m: bool(m.any()),
    lambda x, m: torch.equal(x, x),
    lambda x, m: torch.repeat_interleave(m.long()),
])
def test_data_dependent_shapes_and_host_reads_are_syncs(snippet):
    x = torch.randn(N)
    m = x > 0
    with OpCounter() as c:
        snippet(x, m)
    assert c.syncs >= 1


def test_bool_mask_index_put_is_a_sync_but_integer_index_is_not():
    x = torch.randn(N)
    m = x > 0
    idx = torch.arange(10)
    with OpCounter() as c:
        x[idx]
        y = x.clone()
        y[idx] = 0.0
    assert c.syncs == 0
    with OpCounter() as c:
        y[m] = 0.0
    assert c.syncs == 1


def test_masked_math_without_syncs():
    x = torch.randn(N)
    m = (x > 0).float()
    with OpCounter() as c:
        (x * m).sum() / m.sum().clamp_min(1)
    assert c.syncs == 0 and c.launches == 5


def test_views_count_nothing():
    x = torch.randn(10, 100)
    with OpCounter() as c:
        v = x.view(1000).reshape(100, 10).t().transpose(0, 1).permute(1, 0)
        v = x.unsqueeze(0).squeeze(0)[3].select(0, 1)
        x[:, 2:5].expand(2, 10, 3).detach()
        x.as_strided((10,), (1,))
    assert (c.launches, c.bytes, c.syncs, c.allocs) == (0, 0, 0, 0)
    assert v.shape == ()


def test_allocations_are_not_launches_but_fills_are():
    with OpCounter() as c:
        torch.empty(N)
        torch.empty_like(torch.empty(3))
    assert (c.launches, c.allocs, c.alloc_bytes) == (0, 3, N * 4 + 2 * 12)
    with OpCounter() as c:
        torch.zeros(N)
    assert (c.launches, c.allocs) == (1, 0)


def test_views_count_viewed_elements_and_broadcast_once():
    x = torch.randn(100, 100)
    assert tensor_bytes(x[:, :10]) == 100 * 10 * 4
    assert tensor_bytes(torch.randn(100)[:, None].expand(100, 4096)) == 100 * 4
    with OpCounter() as c:
        x[:10] * 2.0
    assert c.bytes == 2 * 10 * 100 * 4


def test_backward_is_counted():
    x = torch.randn(N, requires_grad=True)
    seed = torch.ones(())
    with OpCounter() as c:
        (x.exp() * 2.0).sum().backward(seed)
    assert c.syncs == 0
    # forward: exp, mul, sum; backward: mul (grad*2), mul (grad*exp) — the
    # broadcast of the seed is a view and the gradient is stolen, not copied.
    assert c.launches == 5, c.ops


def test_strict_mode_raises_on_item_and_passes_clean_code():
    x = torch.randn(N)
    with pytest.raises(RuntimeError, match="sync"):
        with OpCounter(strict=True):
            x.sum().item()
    with pytest.raises(RuntimeError, match="sync"):
        with OpCounter(strict=True):
            x[x > 0]
    with OpCounter(strict=True) as c:
        torch.where(x > 0, x, 0.0).sum()
    assert c.syncs == 0


def test_peak_bytes_follow_storage_lifetimes():
    x = torch.randn(N)
    with OpCounter() as c:
        y = x * 2.0  # 4000 B live
        z = y + 1.0  # 8000 B live
        del y  # 4000 B live
        w = z * 3.0  # 8000 B live
        del z, w
        big = torch.empty(3 * N)  # 12000 B live
        del big
    assert c.peak_bytes == 3 * N * 4


def test_counters_nest_and_count_work_combines():
    a, b = _pair()
    with count_work() as w:
        with OpCounter() as inner:
            a * b
        a + b
    assert inner.launches == 1
    assert (w.torch_launches, w.triton_launches, w.launches, w.syncs) == (2, 0, 2, 0)
    assert w.bytes == 2 * 3 * N * 4
    assert w.as_dict()["torch_ops"] == ["aten::mul.Tensor", "aten::add.Tensor"]


_TRITON_SNIPPET = textwrap.dedent("""
    import json, torch, triton, triton.language as tl
    from isreshape_triton.dev.profiling import LaunchCounter, OpCounter, count_work

    @triton.jit
    def scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=keep) * 2.0, mask=keep)

    x = torch.randn(1000)
    y = torch.empty_like(x)
    with count_work() as w:
        scale_kernel[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
    with LaunchCounter() as lc:
        scale_kernel[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](x, y, 1000, BLOCK=128)
    with OpCounter() as oc:  # an OpCounter alone pauses during launches too
        scale_kernel[(4,)](x, y, 1000, BLOCK=256)
    print(json.dumps({"triton": w.triton_launches, "torch": w.torch_launches, "bytes": w.bytes,
                      "syncs": w.syncs, "kernels": w.kernels, "grid": w.triton.records[0].grid,
                      "callable_grid": lc.records[0].grid, "alone": oc.launches,
                      "ok": bool(torch.equal(y, 2 * x))}))
""")


def _check_triton_counts(result):
    assert result["ok"]
    assert result["triton"] == 1 and result["kernels"] == ["scale_kernel"]
    assert result["torch"] == 0 and result["bytes"] == 0 and result["syncs"] == 0
    assert result["alone"] == 0
    assert tuple(result["grid"]) == (4,) and tuple(result["callable_grid"]) == (8,)


def test_triton_launch_under_interpreter_subprocess():
    """A tiny @triton.jit kernel under TRITON_INTERPRET=1: one Triton launch, and the
    interpreter's host copies (new_empty/set_/copy_) are not counted as torch work."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SNIPPET], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_triton_counts(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")
def test_triton_launch_in_process(capsys, tmp_path):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    script = tmp_path / "triton_snippet.py"  # @triton.jit needs the source in a file
    script.write_text(_TRITON_SNIPPET.replace("torch.randn(1000)", f"torch.randn(1000, device='{device}')"))
    runpy.run_path(str(script))
    _check_triton_counts(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_bench_quick_writes_table_json_and_png(tmp_path):
    """``python -m bench --quick`` (the CI mode): every family and implementation reported."""
    pytest.importorskip("matplotlib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Cost counts" in proc.stdout and "| is_reshape |" in proc.stdout
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "latest.json").read_text())
    import isreshape_triton as irt
    runs = data["runs"]
    for family in irt.LOSS_TYPES:
        eager = [r for r in runs if r["family"] == family and r["impl"] == "eager"]
        assert eager and all(r["status"] == "ok" for r in eager)
        # the trainers' metrics are read with .item(); verl's gpg returns none
        assert all(r["syncs"] > 0 for r in eager) or family == "gpg"
        fused = [r for r in runs if r["family"] == family and r["impl"] == "fused"]
        assert fused and all(r["status"] == "ok" or "unavailable" in r["status"] for r in fused)
        for r in fused:
            if r["status"] == "ok":
                assert r["triton_launches"] >= 1 and r["syncs"] == 0
    assert len(data["acceptance"]) == len(irt.LOSS_TYPES)
