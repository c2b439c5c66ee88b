"""The sm_90 SASS of the optimal-sampling kernels and their H100 cost model (SPEC §9, §13).

Two specializations of one ``optimal_sampling`` call (traced on ``meta`` tensors by
``bench.sampling.trace_sampling``) are compiled for sm_90 with their SASS, in a subprocess without
TRITON_INTERPRET (cached in bench/results/sass_cache like tests/test_sass.py): the fp32 Newton
search pass (the launch a kl_symmetry call repeats) and the fp64 SNR search pass (the heaviest V
loop). Checked: no spills, the V loop is found and holds no ``BAR.*`` (lane accumulators, SPEC §13),
and the model of those launches is produced, labelled MODEL, with its assumptions.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import h100  # noqa: E402
from bench import sampling as bs  # noqa: E402
from bench import sass_model as sm  # noqa: E402

pytest.importorskip("triton")

N, V = 4, 20000  # 8 programs: 4 rows × 2 segments of 16384 elements


def _search_launch(method: str, index: int):
    from isreshape_triton.dev import aot

    tr = bs.trace_sampling(N, V, torch.float32, method)
    alpha = [la for la in tr.launches if aot.kernel_path(la.kernel).endswith(":sampling_alpha_kernel")]
    return alpha[index], tr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from isreshape_triton.dev import aot

    import triton.language as tl

    # kl_symmetry: a middle (fp32) Newton pass; snr: a refinement pass (SNR terms at G points, fp64)
    (newton, tr), (snr, _) = _search_launch("kl_symmetry", 2), _search_launch("snr", 3)
    assert newton.constexprs["ACC"] == tl.float32 and not newton.constexprs["EVAL_SNR"]
    assert snr.constexprs["EVAL_SNR"] and snr.constexprs["SNR_UPDATE"] == 3
    launches = [newton, snr]
    cache = h100.CACHE_DIR if os.access(h100.CACHE_DIR.parent, os.W_OK) else tmp_path_factory.mktemp("sass")
    rows = h100.compiled([aot.launch_spec(la, jit_values=True) for la in launches], cache, log=None)
    return launches, rows, tr


def test_sampling_kernels_compile_without_spills_and_v_loops_hold_no_barrier(compiled):
    launches, rows, _ = compiled
    for launch, row in zip(launches, rows):
        assert "error" not in row, row.get("error", "")[:300]
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["local_bytes"] == 0
        (fn,) = [f for f in sm.parse_sass(row["sass"], row["sass_lines"]) if f.name == "sampling_alpha_kernel"]
        assert sm.bars_in_innermost_loops(fn) == []  # SPEC §13: 0 BAR.* inside innermost loops
        k = h100.structure(row, bs.SAMPLING_TILE)
        assert k.tile is not None and k.tile.bar == 0 and k.tile.global_loads >= 2, k.tile_source
        assert "range(e0, e1, BLOCK)" in fn.source_text[k.tile_source]
        assert k.once.bar >= 1  # the lane → row reductions after the V loop
    # the SNR launch is costed with its SNR loop: BLOCK / G elements per iteration
    newton, snr = launches
    k_newton, k_snr = (h100.structure(r, bs.SAMPLING_TILE) for r in rows)
    assert not bs.snr_tile(k_newton) and bs.snr_tile(k_snr)
    seg = min(newton.args["seg"], V)
    assert bs.sampling_work(newton, k_newton).tiles_per_item == -(-seg // newton.constexprs["BLOCK"])
    assert bs.sampling_work(snr, k_snr).tiles_per_item == -(-seg // (snr.constexprs["BLOCK"] // snr.constexprs["G"]))


def test_sampling_model_is_produced_and_labelled(compiled):
    launches, rows, tr = compiled
    part = h100.Trace(launches, 0, 0, 0)
    fused = bs.model_call(part, rows)
    assert fused.triton_launches == 2 and len(fused.launches) == 2
    for lc in fused.launches:
        assert lc["us"] > sm.H100.launch_s * 1e6 and lc["bound"].split(":")[0] in ("tile", "once")
    row = bs.model_row("kl_symmetry", "fp32", N, V, part, rows)
    assert row["model_us"] == pytest.approx(fused.seconds * 1e6) and row["roofline_us"] > 0
    assert row["budget"] == (row["search_passes"] + 2) * V * 4 == row["bytes_per_row_per_tensor"]
    text = bs.model_text([row], [("kl_symmetry", "fp32", r) for r in rows])
    assert "a MODEL, not a measurement" in text and sm.assumptions_text() in text
    for line in bs.MODEL_ASSUMPTIONS:
        assert line in text
    assert "**MODEL µs**" in text and "(K+2)·V·itemsize" in text and "BAR in innermost loops" in text
    # the whole call's launch list: pass 0, K search passes, draw, finalize + the seed
    from isreshape_triton import sampling as S

    assert len(tr.launches) == S.launch_count("kl_symmetry") and tr.aten_launches == 1 and tr.syncs == 0


def test_every_sampling_kernel_compiles_without_spills(tmp_path):
    """Every kernel ``optimal_sampling`` launches (the draw, the statistics pass and the finalize
    in each fp32 specialization: method, reference, log q output, CONTIG) compiles for sm_90 with
    no spills; the search pass is the fixture's (above). Runs on the oldest Triton too."""
    from isreshape_triton.dev import aot
    from isreshape_triton.dev.aot import sampling_specs

    specs = [s for s in sampling_specs() if s["signature"]["pol_ptr"] == "*fp32"
             and not s["kernel"].endswith(":sampling_alpha_kernel")]
    rows = aot.run_in_subprocess(specs, tmp_path / "aot.json")
    assert {r["kernel"].split(":")[1] for r in rows} == {"sampling_draw_kernel", "sampling_stats_kernel",
                                                         "sampling_finalize_kernel"}
    for row in rows:
        assert "error" not in row, row.get("error", "")[:300]
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["local_bytes"] == 0, row
