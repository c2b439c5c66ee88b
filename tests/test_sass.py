"""The sm_90 SASS of the kernels, read by bench/sass_model.py (SPEC §13).

* the parser on hand-written SASS (loops, nesting, barriers, load widths, load chains,
  labels and line info, dead code) and on tiny compiled kernels, so that the test shows it
  sees a BAR.SYNC inside a loop when there is one;
* every kernel the op launches (forward and backward, traced from ``launch.plan_launches`` by
  ``bench.h100.trace`` for a pairwise set of families, options, fp32/bf16 and shapes): no spills,
  and no ``BAR.*`` inside any innermost loop;
* the H100 model: its assumptions are printed, and it is never faster than the roofline.

Compilation runs once, in a subprocess without TRITON_INTERPRET (``aot.run_in_subprocess``);
rows are cached in bench/results/sass_cache (keyed by specialization, kernel sources and Triton
version), which ``python -m bench`` shares.
"""
import math
import os
import sys

import pytest

import isreshape_triton as irt
from isreshape_triton.params import RolloutCorrection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import h100  # noqa: E402
from bench import sass_model as sm  # noqa: E402

pytest.importorskip("triton")

# ----------------------------------------------------------------------------- hand-written SASS

NESTED = """
	code for sm_90a
		Function : nested_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/               @P0 EXIT ;
        /*0040*/                   MOV R2, RZ ;
        /*0050*/                   IMAD.WIDE R4, R0, 0x4, R6 ;
        /*0060*/                   LDG.E.128 R8, desc[UR4][R4.64] ;
        /*0070*/                   FADD R2, R8, R2 ;
        /*0080*/                   MOV R3, RZ ;
        /*0090*/                   SHFL.BFLY PT, R12, R2, 0x10, 0x1f ;
        /*00a0*/                   STS [R1], R12 ;
        /*00b0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00c0*/                   LDS R13, [R1] ;
        /*00d0*/                   MUFU.EX2 R14, R13 ;
        /*00e0*/                   IADD3 R3, R3, 0x1, RZ ;
        /*00f0*/                   ISETP.GE.AND P1, PT, R3, 0x8, PT ;
        /*0100*/              @!P1 BRA 0x90 ;
        /*0110*/                   STG.E.64 desc[UR4][R4.64], R14 ;
        /*0120*/                   IADD3 R0, R0, 0x100, RZ ;
        /*0130*/                   ISETP.GE.AND P2, PT, R0, 0x1000, PT ;
        /*0140*/              @!P2 BRA 0x50 ;
        /*0150*/                   EXIT ;
        /*0160*/                   BRA 0x160;
"""

CHAIN = """
		Function : chain_kernel
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   IMAD.WIDE R2, R0, 0x4, R10 ;
        /*0020*/                   LDG.E.U8 R4, desc[UR4][R2.64] ;
        /*0030*/                   ISETP.NE.AND P0, PT, R4, RZ, PT ;
        /*0040*/                   IMAD.WIDE R6, R0, 0x4, R12 ;
        /*0050*/               @P0 LDG.E R5, desc[UR4][R6.64] ;
        /*0060*/                   LDG.E R8, desc[UR4][R6.64+0x4] ;
        /*0070*/                   FADD R9, R5, R8 ;
        /*0080*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0090*/                   ISETP.GE.AND P1, PT, R0, 0x40, PT ;
        /*00a0*/              @!P1 BRA 0x10 ;
        /*00b0*/                   EXIT ;
"""

LABELLED = """
.text.labelled_kernel:
	//## File "/nowhere/k.py", line 3
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
	//## File "/nowhere/k.py", line 7
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FADD R3, R2, R3 ;
        /*0030*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0040*/                   ISETP.GE.AND P0, PT, R0, 0x40, PT ;
        /*0050*/              @!P0 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
.L_x_1:
        /*0070*/                   BRA `(.L_x_1);
"""


def test_parser_finds_nested_loops_and_counts_per_iteration():
    (fn,) = sm.parse_sass(NESTED)
    assert fn.name == "nested_kernel" and len(fn.loops) == 2  # the BRA-to-itself after EXIT is dead code
    outer, inner = sorted(fn.loops, key=lambda lp: -len(lp.blocks))
    assert inner.parent is outer and outer.children == [inner] and inner.innermost and not outer.innermost
    st = sm.region_stats(fn.loop_instrs(inner))
    assert (st.instructions, st.bar, st.shfl, st.mufu, st.global_loads) == (8, 1, 1, 1, 0)
    so = sm.region_stats(fn.loop_instrs(outer))
    assert so.global_loads == 1 and so.load_bytes == 16 and so.global_stores == 1 and so.store_bytes == 8
    assert so.bar == 1 and so.instructions == 16
    assert sm.bars_in_innermost_loops(fn) == [(None, 1)]
    # no line info: the tile loop would be the innermost loop moving the most global bytes; this one moves none
    assert sm.kernel_structure(fn).tile is None


def test_parser_dependent_load_chain_and_memory_waits():
    (fn,) = sm.parse_sass(CHAIN)
    (loop,) = fn.loops
    st = sm.region_stats(fn.loop_instrs(loop))
    assert st.global_loads == 3 and st.load_widths == [1, 4, 4]
    assert st.load_chain == 2  # the second load is predicated on the first one's value
    assert st.mem_waits == 2  # the ISETP waits for the mask, the FADD for the other two loads
    assert st.wait_gaps == [1, 1]  # each issued right after its load: almost the whole round trip


AHEAD = """
		Function : ahead_kernel
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
""" + "".join(f"        /*{0x20 + 0x10 * k:04x}*/                   FFMA R6, R6, R7, R8 ;\n" for k in range(300)) + """
        /*12e0*/                   MOV R5, R4 ;
        /*12f0*/                   IADD3 R0, R0, 0x1, RZ ;
        /*1300*/                   ISETP.GE.AND P1, PT, R0, 0x40, PT ;
        /*1310*/              @!P1 BRA 0x10 ;
        /*1320*/                   EXIT ;
"""


def test_wait_is_what_is_left_of_the_round_trip():
    """A load issued 300 instructions before its use (a tile ahead) leaves 800 − 300·2 cycles to wait."""
    (fn,) = sm.parse_sass(AHEAD)
    (loop,) = fn.loops
    st = sm.region_stats(fn.loop_instrs(loop))
    assert st.mem_waits == 1 and st.wait_gaps == [301]
    m = sm.H100
    cycles, _, terms = sm._region_cycles(st, m, 8, 1, m.dram_latency_cycles, 13.0)
    assert terms["latency"] == pytest.approx(m.dram_latency_cycles - 301 * 2 + st.instructions * 2)
    late = sm.RegionStats(**{**st.as_dict(), "wait_gaps": [0]})
    assert sm._region_cycles(late, m, 8, 1, m.dram_latency_cycles, 13.0)[2]["latency"] == pytest.approx(
        m.dram_latency_cycles + st.instructions * 2)


TICKET = """
		Function : ticket_kernel
        /*0000*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R5, R4, R4 ;
        /*0020*/                   STG.E desc[UR4][R2.64], R5 ;
        /*0030*/                   ATOMG.E.ADD.STRONG.GPU PT, R6, desc[UR4][R8.64], R10 ;
        /*0040*/                   ISETP.NE.AND P0, PT, R6, 0xff, PT ;
        /*0050*/               @P0 EXIT ;
        /*0060*/                   LDG.E.128 R12, desc[UR4][R2.64] ;
        /*0070*/                   FADD R16, R12, R13 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/                   STG.E desc[UR4][R2.64], R16 ;
        /*00a0*/                   EXIT ;
"""


def test_last_program_region_runs_once_per_launch():
    (fn,) = sm.parse_sass(TICKET)
    plain = sm.kernel_structure(fn)
    k = sm.kernel_structure(fn, last_program=True)
    assert plain.last is None and plain.once.instructions == 11
    assert k.once.instructions == 4 and k.last.instructions == 7 and k.last.bar == 1 and k.last.load_bytes == 16
    m = sm.H100
    grid = 4 * m.sms * sm.ctas_per_sm(40, 4)  # four waves: every-program code 4×, the last program's once
    one, _, _ = sm._region_cycles(k.last, m, 4, 1, m.l2_latency_cycles, m.sm_max_bytes_per_cycle)
    waves = sm.launch_time(sm.KernelStructure("k", [], None, None, None, k.once), 40, 4, 0, grid, None)
    both = sm.launch_time(k, 40, 4, 0, grid, None)
    assert waves.waves == 4 and both.seconds == pytest.approx(waves.seconds + one / m.clock_hz)


def test_parser_labels_line_info_and_tile_loop():
    (fn,) = sm.parse_sass(LABELLED)
    assert fn.name == "labelled_kernel" and len(fn.loops) == 1  # `.L_x_1` spins after EXIT: unreachable
    assert fn.loops[0].source == "k.py:7"
    # the back edge is on line 7 of a missing file: no "BLOCK_T" text, so no tile loop
    k = sm.kernel_structure(fn)
    assert k.tile is None and k.once.global_loads == 1


def test_ctas_per_sm_rule():
    assert sm.ctas_per_sm(255, 8) == 1  # 32·255 → 8192 registers per warp: 8 warps fit
    assert sm.ctas_per_sm(128, 4) == 4
    assert sm.ctas_per_sm(103, 8) == 2  # 3328 per warp: 19 warps fit
    assert sm.ctas_per_sm(32, 4) == 16  # 2048 threads
    assert sm.ctas_per_sm(16, 1) == 32  # at most 32 CTAs
    assert sm.ctas_per_sm(32, 4, shared_bytes=100 * 1024) == 2


def _stats(**kw):
    st = sm.RegionStats()
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_launch_time_streaming_is_memory_bound_and_barriers_cost():
    m = sm.H100
    tile = _stats(instructions=60, global_loads=4, global_stores=1, load_bytes=16, store_bytes=4, load_chain=1,
                  mem_waits=1)
    k = sm.KernelStructure("k", [], tile, sm.RegionStats(), sm.RegionStats(), sm.RegionStats(), "k.py:1", 2)
    tokens, block, grid = 1 << 22, 128, 8 * m.sms  # one token per thread; 8 CTAs per SM keep bytes in flight
    work = sm.Work(math.ceil(tokens / block / grid), 1.0, 1.0)
    cost = sm.launch_time(k, 40, 4, 0, grid, work)
    floor = tokens * 20 / m.achievable_bytes_per_s + m.launch_s
    assert cost.bound == "tile:memory" and floor <= cost.seconds <= 1.1 * floor
    few = sm.launch_time(k, 40, 4, 0, 2 * m.sms, sm.Work(math.ceil(tokens / block / 2 / m.sms), 1.0, 1.0))
    assert few.bound == "tile:latency" and few.seconds > 1.5 * cost.seconds  # Little's law: too little in flight
    barred = sm.KernelStructure("k", [], _stats(**{**tile.as_dict(), "bar": 20}), sm.RegionStats(),
                                sm.RegionStats(), sm.RegionStats(), "k.py:1", 2)
    assert sm.launch_time(barred, 40, 4, 0, grid, work).seconds > 1.5 * cost.seconds
    one = sm.launch_time(k, 40, 4, 0, 1, sm.Work(1, 1.0, tokens / block))  # one program: one SM, latency
    assert one.bound == "tile:latency" and one.seconds > 50 * cost.seconds


def test_launch_work_rows_and_chunks():
    k3 = sm.KernelStructure("k", [], sm.RegionStats(), sm.RegionStats(), sm.RegionStats(), sm.RegionStats(),
                            "k.py:1", 3)

    class L:
        pass

    rows = L()
    rows.grid, rows.args, rows.constexprs = (256,), {"R": 1024, "T": 4096}, {"BLOCK_T": 256}
    w = h100.launch_work(rows, k3)
    assert (w.items_per_program, w.pieces_per_item, w.tiles_per_item) == (4, 1.0, 16.0)
    chunks = L()
    chunks.grid = (264,)
    chunks.args = {"N": 1 << 20, "T": 1 << 20, "S": 1, "chunk": 4096, "n_chunks": 256}
    chunks.constexprs = {"BLOCK_T": 1024}
    w = h100.launch_work(chunks, k3)
    assert (w.items_per_program, w.pieces_per_item, w.tiles_per_item) == (1, 1.0, 4.0)
    packed = L()
    packed.grid, packed.constexprs = (264,), {"BLOCK_T": 1024}
    packed.args = {"N": 1 << 20, "T": 0, "S": 1, "chunk": 4096, "n_chunks": 256}
    w = h100.launch_work(packed, k3)  # row lengths unknown: one boundary per mean row length
    assert w.items_per_program == 1 and 1.0 <= w.pieces_per_item < 1.01 and 4.0 <= w.tiles_per_item < 4.01
    aligned = L()
    aligned.grid, aligned.constexprs = (264,), {"BLOCK_T": 512}
    aligned.args = {"N": 1024 * 4096, "T": 4096, "S": 1024, "chunk": 4096, "n_chunks": 1024}
    w = h100.launch_work(aligned, k3)  # chunks are rows: one piece of 8 tiles each
    assert (w.items_per_program, w.pieces_per_item, w.tiles_per_item) == (4, 1.0, 8.0)
    ragged = L()
    ragged.grid, ragged.constexprs = (264,), {"BLOCK_T": 512}
    ragged.args = {"N": 1000 * 3000, "T": 3000, "S": 1000, "chunk": 4096, "n_chunks": 733}
    w = h100.launch_work(ragged, k3)  # 3 chunks per program; a chunk meets 2 or 3 rows
    assert w.items_per_program == 3 and 2.0 <= w.pieces_per_item <= 3.0 and w.tiles_per_item >= 4096 / 512 + 1
    fixed = L()
    fixed.grid, fixed.args, fixed.constexprs = (1,), {"n": 3}, {"BLOCK_P": 256}
    assert h100.launch_work(fixed, k3) is None


# ----------------------------------------------------------------------------- compiled kernels

TINY = "_sass_kernels"
TINY_SPECS = [
    {"kernel": f"{TINY}:sum_in_loop_kernel", "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
     "constexprs": {"BLOCK_T": 256}, "options": {"num_warps": 4, "num_stages": 1}},
    {"kernel": f"{TINY}:lane_sum_kernel", "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
     "constexprs": {"BLOCK_T": 256}, "options": {"num_warps": 4, "num_stages": 1}},
] + [
    {"kernel": f"{TINY}:masked_load_kernel",
     "signature": {"x_ptr": "*fp32", "m_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
     "constexprs": {"MASK_PREDICATES": flag, "BLOCK_T": 256}, "options": {"num_warps": 4, "num_stages": 1}}
    for flag in (True, False)
]

# pairwise: every family in fp32 at every shape (the model test), plus options and bf16 at one shape
OP_CONFIGS = [(fam, "fp32", (), None) for fam in irt.LOSS_TYPES] + [
    ("is_reshape", "fp32", (("gamma", "ess_exact"),), (16, 4096)),
    ("is_reshape", "fp32", (("gamma_granularity", "sequence"),), (16, 4096)),
    ("is_reshape", "fp32", (("gamma", "psis"),), (16, 4096)),
    ("is_reshape_sign", "bf16", (("gamma", "ess_exact"),), (16, 4096)),
    ("ppo_clip", "bf16", (), (16, 4096)),
    # the rollout correction: token weights and rejection in the loss pass, a row quantity through
    # pass 1 (every shape: the model's bar too), the rejection in a statistics pass
    ("ppo_clip", "fp32", (("rollout_correction", RolloutCorrection("mask", 0.5, 2.0, "k3", None, 0.1)),), None),
    ("ppo_clip", "fp32", (("rollout_correction", RolloutCorrection(level="sequence", reject="k3", reject_max=0.1,
                                                                   reject_level="sequence_max")),), None),
    ("is_reshape", "bf16", (("rollout_correction", RolloutCorrection(reject="k1", reject_min=0.5)),), (16, 4096)),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(cache dir, rows of the tiny kernels, [(config, spec, row)] of every op launch)."""
    from isreshape_triton.dev import aot

    op = []
    for cfg in OP_CONFIGS:
        fam, dtype, options, shape = cfg
        case_list = h100.cases() if shape is None else [h100.Case("x".join(map(str, shape)), *shape)]
        for case in case_list:
            for launch in h100.trace(fam, case, h100.DTYPES[dtype], dict(options)).launches:
                op.append((cfg, aot.launch_spec(launch, jit_values=True)))
    # the bench's cache (keyed by specialization, kernel sources and Triton version), else a temporary one
    cache = h100.CACHE_DIR if os.access(h100.CACHE_DIR.parent, os.W_OK) else tmp_path_factory.mktemp("sass")
    with pytest.MonkeyPatch.context() as mp:  # the compiling subprocess imports the tiny kernels
        mp.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), ROOT, os.environ.get("PYTHONPATH", "")]))
        rows = h100.compiled(TINY_SPECS + [s for _, s in op], cache, log=None)
    return cache, rows[:len(TINY_SPECS)], [(cfg, s, r) for (cfg, s), r in zip(op, rows[len(TINY_SPECS):])]


def _fn(row):
    assert "error" not in row, row.get("error")
    return sm.parse_sass(row["sass"], row["sass_lines"])[0]


def test_parser_sees_a_barrier_inside_a_loop_of_a_compiled_kernel(compiled):
    _, (with_sum, lanes, chained, bounds), _ = compiled
    fn = _fn(with_sum)
    (loop,) = [lp for lp in fn.loops if lp.innermost]
    assert "BLOCK_T" in fn.source_text[loop.source]  # line info names the tile loop
    assert sm.bars_in_innermost_loops(fn) and sm.region_stats(fn.loop_instrs(loop)).bar >= 1
    assert sm.region_stats(fn.loop_instrs(loop)).shfl >= 5
    fn = _fn(lanes)
    assert sm.bars_in_innermost_loops(fn) == []
    assert sm.region_stats(fn.reachable_instrs()).bar >= 1  # the one reduction after the loop
    k = sm.kernel_structure(fn)
    assert k.tile is not None and k.tile.bar == 0 and k.tile.global_loads >= 1 and k.once.bar >= 1


def test_parser_sees_loads_predicated_on_loaded_values(compiled):
    _, (_, _, chained, bounds), _ = compiled
    assert sm.kernel_structure(_fn(chained)).tile.load_chain == 2
    assert sm.kernel_structure(_fn(bounds)).tile.load_chain == 1


def test_op_kernels_compile_for_sm90_without_spills(compiled):
    _, _, op = compiled
    assert op
    for cfg, spec, row in op:
        assert "error" not in row, (cfg, spec["kernel"], row.get("error", "")[:300])
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["local_bytes"] == 0, (cfg, row["kernel"])
        assert 0 < row["registers"] <= 255


def test_no_block_reduction_inside_any_innermost_loop(compiled):
    """SPEC §13: 0 BAR.* inside the innermost loops (tile loops) of every kernel the op launches."""
    _, _, op = compiled
    bad = {}
    for cfg, spec, row in op:
        found = sm.bars_in_innermost_loops(_fn(row))
        if found:
            bad[(spec["kernel"].split(":")[-1], cfg[0], cfg[1])] = found
    assert not bad, "\n".join(f"{k}: {v} (source line, BAR count per iteration)" for k, v in bad.items())


def test_record_merges_take_one_barrier_each(compiled):
    """The program records merge per warp with shuffles and across warps through scratch after one
    CTA barrier (``common.exchange_warps``): the loss kernel's code outside its loops holds at most
    the batch context's and the record's exchanges plus the ticket's barriers, its finalize the
    partials' exchange (token modes), and the statistics pass's record merge one exchange. The
    ess_exact γ rule's grid sums and root solve still reduce CTA-wide (~15 barriers, once per
    program): not counted here."""
    _, _, op = compiled
    seen = set()
    for cfg, spec, row in op:
        name = spec["kernel"].split(":")[-1]
        k = h100.structure(row)
        flags = spec["constexprs"]
        if name == "token_loss_kernel" and not flags["SEQ_AGG"] and flags["GAMMA_MODE"] != 2:  # not ess_exact
            assert k.once.bar <= 4 and k.last is not None and k.last.bar <= 3, (cfg, k.once.bar, k.last.bar)
            seen.add(name)
        elif name == "batch_stats_kernel" and not flags["ROW_STATS"] and flags["BLOCK_T"] % 256 == 0:
            assert k.once.bar <= 1, (cfg, k.once.bar)
            seen.add(name)
    assert seen == {"token_loss_kernel", "batch_stats_kernel"}


def test_model_states_its_assumptions_and_is_never_faster_than_the_roofline(compiled):
    cache, _, _ = compiled
    text = sm.assumptions_text()
    for needle in ("MODEL, not a measurement", "132 SMs", "GHz", "3.35 TB/s", "achievable", "DRAM round trip",
                   "L2 round trip", "BAR", "launch overhead", "Little's law", "CTAs/SM", "schedulers"):
        assert needle in text, needle
    configs = [(fam, "fp32", options) for fam, dtype, options, shape in OP_CONFIGS if shape is None]
    results = h100.model(configs, measure=False, log=None, cache_dir=cache)
    rendered = h100.render(results)
    assert text in rendered and "MODEL" in rendered
    assert len(results) == len(configs)
    for label, rs in results.items():
        assert len(rs) == len(h100.cases())
        for r in rs:
            assert r.fused.seconds >= r.roofline_s, (label, r.case.label, r.fused.seconds, r.roofline_s)
            assert r.eager[1] >= r.eager[0] > 0 and r.fused.triton_launches >= 1
            assert all(lc["us"] > 0 for lc in r.fused.launches)


def test_model_within_spec13_bar(compiled):
    """SPEC §13: modelled time ≤ 1.5 × roofline and below the eager model at every shape, every family
    (and with a rollout correction: its stream in the roofline's bytes)."""
    cache, _, _ = compiled
    configs = [(fam, "fp32", options) for fam, dtype, options, shape in OP_CONFIGS if shape is None]
    results = h100.model(configs, measure=False, log=None, cache_dir=cache)
    misses = {label: h100.acceptance(rs)[1] for label, rs in results.items() if h100.acceptance(rs)[0] != "PASS"}
    assert not misses, h100.acceptance_text(results)


def test_source_lines_found_from_another_checkout():
    """A cubin from Triton's cache may carry the line info of another checkout of the same sources:
    the model reads the line from this checkout (or site-packages) by the path's tail."""
    moved = "/elsewhere/checkout/kernels/stats.py"
    with open(os.path.join(ROOT, "kernels", "stats.py")) as fh:
        assert sm._source_line(moved, 3) == fh.readlines()[2].strip() != ""
    assert sm._source_line("/nowhere/at/all.py", 1) == ""
