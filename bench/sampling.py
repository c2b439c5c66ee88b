"""``python -m bench.sampling [--experiment] [--aot]``: what one call of ``irt.optimal_sampling``
costs per decode step (bench/results/sampling.md), and (``--experiment``) the learning-speed
experiment of issue 11 (bench/results/sampling_experiment.{md,png,json}).

Cost table (machine-independent): launches, streaming passes, bytes per row read from the logits
against the budget (Newton iterations + 2) × V × itemsize per logits tensor, the fp64 record
traffic (L2-resident), programs per launch, and an H100 *model* time (bytes / 3.35 TB/s +
4 µs × launches; not a measurement). The launch and sync counts are also measured by running the
op once (interpreter on a CPU). ``--aot`` compiles every specialization for sm_90 and prints
registers and spills. With CUDA the op is timed with ``triton.testing.do_bench``.

``--model`` adds the SASS cost model of SPEC §13 (bench/results/sampling_model.{md,json}): every
launch of one call at ``MODEL_SHAPES`` is traced on ``meta`` tensors, compiled for sm_90 as the GPU
JIT would (cached in bench/results/sass_cache/), and timed by the loss op's model
(``bench/sass_model.py``, ``bench/h100.fused_model``) with the V loops as tile loops: a MODEL, not
a measurement, beside the roofline and the (K + 2) · V · itemsize bound.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import use_interpreter

H100_BW = 3.35e12
LAUNCH_S = 4e-6
SHAPES = [(1, 32000), (1, 262144), (8, 128256), (64, 151936), (256, 151936), (1024, 32000)]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cost_table(dtypes=("bf16", "fp32")) -> tuple:
    from isreshape_triton import sampling as S

    item = {"bf16": 2, "fp32": 4}
    lines = ["| method | logits | N × V | launches | passes over the logits | bytes / row per logits tensor "
             "| budget (K+2)·V·itemsize | records (L2) / row | programs per launch | H100 *model* µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for method in ("kl_symmetry", "snr", "fixed"):
        for dt in dtypes:
            for n, v in SHAPES:
                tm = S.traffic_model(n, v, item[dt], method)
                per_tensor = tm["passes"] * v * item[dt]
                budget = (S.NEWTON_PASSES + 2) * v * item[dt]
                launches = S.launch_count(method)
                programs = n * tm["segments_per_row"]
                model_us = 1e6 * (tm["total"] / H100_BW + LAUNCH_S * launches)
                rows.append(dict(method=method, dtype=dt, n=n, v=v, launches=launches, passes=tm["passes"],
                                 bytes_per_row_per_tensor=per_tensor, budget=budget,
                                 records_per_row=tm["records"] / n, programs=programs, model_us=model_us))
                lines.append(f"| {method} | {dt} | {n} × {v} | {launches} | {tm['passes']} | {per_tensor:,} "
                             f"| {budget:,} | {tm['records'] / n:,.0f} | {programs} | {model_us:.1f} |")
    return "\n".join(lines), rows


def measured_counts() -> str:
    """Run each method once on a small batch and count launches and syncs."""
    import torch

    import isreshape_triton as irt
    from isreshape_triton import sampling as S
    from isreshape_triton.dev.profiling import count_work

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(4, 300, device=dev)
    b = a + torch.randn(4, 300, device=dev)
    lines = ["| method | Triton launches (expected) | aten launches | host syncs |", "|---|---|---|---|"]
    for method in ("kl_symmetry", "snr", 0.5):
        with count_work(strict=True) as w:
            irt.optimal_sampling(a, b, method=method)
        name = method if isinstance(method, str) else "fixed"
        lines.append(f"| {name} | {w.triton_launches} ({S.launch_count(name)}) | {w.torch_launches} | {w.syncs} |")
    return "\n".join(lines)


def gpu_timings() -> str:
    import torch
    import triton

    import isreshape_triton as irt
    from isreshape_triton import sampling as S

    lines = ["| method | N × V (bf16) | µs (do_bench) | GB/s of logits read |", "|---|---|---|---|"]
    for method in ("kl_symmetry", "snr"):
        for n, v in SHAPES:
            a = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
            b = (a.float() + torch.randn_like(a, dtype=torch.float32)).to(torch.bfloat16)
            ms = triton.testing.do_bench(lambda: irt.optimal_sampling(a, b, method=method))
            tm = S.traffic_model(n, v, 2, method)
            lines.append(f"| {method} | {n} × {v} | {1e3 * ms:.1f} | {tm['logits'] / (ms * 1e-3) / 1e9:.0f} |")
    return "\n".join(lines)


def aot_table() -> str:
    from pathlib import Path

    from isreshape_triton.dev import aot

    rows = aot.run_in_subprocess(aot.sampling_specs(), Path(RESULTS) / "sampling_aot.json")
    lines = ["| kernel | specializations | errors | registers (min–max) | spill bytes |", "|---|---|---|---|---|"]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        ks = [r for r in rows if r["kernel"] == kernel]
        ok = [r for r in ks if "error" not in r]
        regs = [r["registers"] for r in ok] or [0]
        spills = sum(r["spill_stores"] + r["spill_loads"] for r in ok)
        lines.append(f"| {kernel.split(':')[1]} | {len(ks)} | {len(ks) - len(ok)} | {min(regs)}–{max(regs)} | {spills} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- SASS cost model

MODEL_SHAPES = [(1, 262144), (64, 151936), (256, 32000), (1024, 128256)]
MODEL_METHODS = ("kl_symmetry", "snr")
MODEL_DTYPES = ("fp32", "bf16")
SAMPLING_TILE = r"range\(e0, e1, BLOCK\)"  # the V loops: ``for t0 in range(e0, e1, BLOCK)``
MODEL_ASSUMPTIONS = [
    "optimal_sampling: a call is pass 0, K search passes, the draw and the finalize (all traced from "
    "``plan_sampling`` at the shape), plus one aten launch (the seed, torch.randint); grid = N × segments;",
    "the tile loop of a kernel is its V loop (``for t0 in range(e0, e1, BLOCK)``), BLOCK elements per "
    "iteration (BLOCK / G in the SNR loop, whose [BLOCK / G, G] tile evaluates G points); a program streams "
    "one segment: the longest (min(seg, V) elements) when the grid is ≤ 132 programs, else the mean over a "
    "row's segments (the last one is shorter; CTAs are dispatched as slots free up), e.g. 64 × 151,936 is "
    "cut into 7 × 20,480 + 8,576 and 1024 × 128,256 into 2 × 45,056 + 38,144 (24 CTAs per SM: whole waves at "
    "4 and 6 resident CTAs); an SNR search launch is costed with its SNR loop (the heavier of its two "
    "V loops) for every row;",
    "the record merges (loops over a row's segments: 64 records per step in the search and draw launches, 32 "
    "in the finalize, 16 for the pass-0 records in the first search launch) are costed once per program: "
    "exact up to 16 segments; at 1 × 262,144 (64 segments) the pass-0 merge runs 4 steps and the finalize's "
    "2, each counted as 1 (about 4 µs left out of that shape's call);",
    "roofline: ``sampling.traffic_model`` bytes (both logits rows per pass + the fp64 records, counted as "
    "HBM traffic although they are L2-resident) / 3.35 TB/s + 4 µs × (Triton + aten launches).",
]


def snr_tile(kernel) -> bool:
    """Whether the costed V loop is the one of ``_snr_segment`` (G points per element)."""
    import inspect

    from isreshape_triton.kernels import sampling as ks

    if not kernel.tile_source:
        return False
    lines, start = inspect.getsourcelines(getattr(ks._snr_segment, "fn", ks._snr_segment))
    return start <= int(kernel.tile_source.rsplit(":", 1)[1]) < start + len(lines)


def sampling_work(launch, kernel):
    """V-loop iterations per program of a sampling launch (``plan_sampling``: one program per
    segment of ``seg`` elements, the row's last segment shorter), BLOCK elements per iteration,
    BLOCK / G in the SNR loop: the longest segment's count when the grid fits one program per SM,
    else the mean over the row's segments (CTAs are dispatched as SMs free up, so a short last
    segment frees its slot early); None for the finalize (no V loop)."""
    import math

    from . import sass_model as sm

    block = launch.constexprs.get("BLOCK")
    if block is None or kernel.tile is None:
        return None
    per_iter = block // launch.constexprs["G"] if snr_tile(kernel) else block
    seg, V, nseg = int(launch.args["seg"]), int(launch.args["V"]), int(launch.args["nseg"])
    longest = math.ceil(min(seg, V) / per_iter)
    mean = ((nseg - 1) * math.ceil(seg / per_iter) + math.ceil((V - (nseg - 1) * seg) / per_iter)) / nseg
    return sm.Work(1, 1.0, float(longest if math.prod(launch.grid) <= sm.H100.sms else mean))


def trace_sampling(n: int, v: int, dtype, method: str):
    """Every launch of one ``optimal_sampling`` call on ``meta`` [n, v] logits (nothing runs), with
    the aten work around it (``bench.h100.Trace``)."""
    import torch

    from isreshape_triton import launch
    from isreshape_triton import sampling as S
    from isreshape_triton.dev.profiling import count_work

    from .h100 import Trace

    recorded = []
    original = launch.Launch.__call__
    launch.Launch.__call__ = lambda self: recorded.append(self)
    try:
        x = torch.empty(n, v, dtype=dtype, device="meta")
        with count_work(track_memory=False) as work:
            S._optimal_sampling_kernels(x, x, None, None, S.validate(x, x, method))
    finally:
        launch.Launch.__call__ = original
    return Trace(recorded, work.torch_launches, work.bytes, work.syncs)


def model_call(tr, rows):
    """The modelled H100 time of one traced call from the compiled rows of its launches."""
    from . import h100

    return h100.fused_model(tr, rows, work=sampling_work, tile_pattern=SAMPLING_TILE)


def model_row(method: str, dtype: str, n: int, v: int, tr, rows) -> dict:
    """One call's MODEL time (total, per kernel, per region) beside its roofline and bytes."""
    from isreshape_triton import sampling as S

    from . import h100
    from . import sass_model as sm

    item = h100.DTYPES[dtype].itemsize
    fused = model_call(tr, rows)
    tm = S.traffic_model(n, v, item, method)
    k = len(S.pass_schedule(method))
    roof = tm["total"] / sm.H100.hbm_bytes_per_s + fused.total_launches * sm.H100.launch_s
    by_kernel, split, vloop_bounds = {}, {"launch": fused.aten_seconds * 1e6, "once": 0.0, "vloop": 0.0}, {}
    for lc in fused.launches:
        by_kernel[lc["kernel"]] = by_kernel.get(lc["kernel"], 0.0) + lc["us"]
        split["launch"] += sm.H100.launch_s * 1e6
        for name, region in lc["detail"].items():
            if isinstance(region, dict):  # launch_time's rule: waves × executions × cycles
                us = lc["waves"] * region["executions"] * region["cycles_each"] / sm.H100.clock_hz * 1e6
                split["vloop" if name == "tile" else "once"] += us
                if name == "tile":
                    vloop_bounds[region["bound"]] = vloop_bounds.get(region["bound"], 0.0) + us
    return dict(method=method, dtype=dtype, n=n, v=v, search_passes=k, passes=tm["passes"],
                bytes_per_row_per_tensor=tm["passes"] * v * item, budget=(k + 2) * v * item,
                bytes=tm["total"], triton_launches=fused.triton_launches, aten_launches=fused.aten_launches,
                syncs=tr.syncs, model_us=fused.seconds * 1e6, roofline_us=roof * 1e6,
                model_over_roofline=fused.seconds / roof, us_by_kernel=by_kernel, us_by_region=split,
                vloop_us_by_bound=vloop_bounds, launches=fused.launches)


def h100_model(methods=MODEL_METHODS, dtypes=MODEL_DTYPES, shapes=MODEL_SHAPES, cache_dir=None, log=sys.stderr):
    """(results, compiled rows) of the SASS cost model at every (method, dtype, shape): every
    specialization the cache lacks is compiled for sm_90 in one subprocess."""
    from isreshape_triton.dev import aot

    from . import h100

    configs = [(m, d, n, v) for m in methods for d in dtypes for n, v in shapes]
    traces = [trace_sampling(n, v, h100.DTYPES[d], m) for m, d, n, v in configs]
    specs = [aot.launch_spec(launch, jit_values=True) for tr in traces for launch in tr.launches]
    rows = iter(h100.compiled(specs, cache_dir or h100.CACHE_DIR, log))
    results, kernel_rows = [], []
    for (m, d, n, v), tr in zip(configs, traces):
        mine = [next(rows) for _ in tr.launches]
        kernel_rows += [(m, d, row) for row in mine]
        results.append(model_row(m, d, n, v, tr, mine))
    return results, kernel_rows


def _kernel_label(row: dict) -> str:
    c = row["constexprs"]
    name = row["kernel"].split(":")[-1].replace("sampling_", "").replace("_kernel", "")
    if name == "alpha":
        acc = c["ACC"]["dtype"] if isinstance(c["ACC"], dict) else c["ACC"]
        what = "SNR pass" if c["EVAL_SNR"] else f"Newton pass ({'fp64' if acc == 'float64' else 'fp32'})"
        name += f" {what}" + (", first" if c["FIRST"] else "")
    return name


def sass_table(kernel_rows) -> str:
    """Per compiled specialization: what its SASS says per V-loop iteration."""
    from . import h100
    from . import sass_model as sm

    lines = ["| method (logits) | kernel | regs | spills (B) | warps | CTAs/SM | V loop | elements / iter "
             "| instr. / iter | BAR / iter | MUFU / iter | FP64 / iter | loads / iter (B each) "
             "| memory waits / iter | BAR in innermost loops |", "|---" * 15 + "|"]
    seen = set()
    for method, dtype, row in kernel_rows:
        k = h100.structure(row, SAMPLING_TILE)
        t = k.tile
        bars = sum(lp.stats.bar for lp in k.innermost())
        occ = sm.ctas_per_sm(row["registers"], row["num_warps"], max(0, row["shared_bytes"]))
        block = row["constexprs"].get("BLOCK")
        per_iter = (block // row["constexprs"]["G"] if snr_tile(k) else block) if t else ""
        cells = ([k.tile_source, per_iter, t.instructions, t.bar, t.mufu, t.fp64,
                  f"{t.global_loads} ({','.join(str(w) for w in sorted(set(t.load_widths)))})", t.mem_waits]
                 if t else ["— (no V loop)"] + [""] * 7)
        line = (f"| {method} ({dtype}) | {_kernel_label(row)} | {row['registers']} "
                f"| {row['spill_stores'] + row['spill_loads']} | {row['num_warps']} | {occ} | "
                + " | ".join(str(c) for c in cells) + f" | {bars} |")
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def render_model(results) -> str:
    from . import h100
    from . import sass_model as sm

    lines = ["| method | logits | N × V | launches (Triton + aten) | K | bytes / row per logits tensor "
             "| (K+2)·V·itemsize | roofline µs | **MODEL µs** | model / roofline | ≤ 1.5× "
             "| MODEL µs: launches + once per program + V loops (V loops by bound) | MODEL µs by kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        parts = ", ".join(f"{k.replace('sampling_', '').replace('_kernel', '')} {us:,.0f}"
                          for k, us in r["us_by_kernel"].items())
        parts += f", aten {r['aten_launches'] * sm.H100.launch_s * 1e6:.0f}"
        reg = r["us_by_region"]
        bounds = ", ".join(f"{b} {us:,.0f}" for b, us in sorted(r["vloop_us_by_bound"].items(), key=lambda x: -x[1]))
        split = f"{reg['launch']:,.0f} + {reg['once']:,.0f} + {reg['vloop']:,.0f} ({bounds})"
        ratio = r["model_over_roofline"]
        lines.append(f"| {r['method']} | {r['dtype']} | {r['n']} × {r['v']:,} | {r['triton_launches']} + "
                     f"{r['aten_launches']} | {r['search_passes']} | {r['bytes_per_row_per_tensor']:,} "
                     f"| {r['budget']:,} | {r['roofline_us']:,.1f} | **{r['model_us']:,.1f}** "
                     f"| {ratio:.2f} | {'yes' if ratio <= h100.ACCEPT_RATIO else 'no'} | {split} | {parts} |")
    return "\n".join(lines)


def model_text(results, kernel_rows) -> str:
    from . import h100
    from . import sass_model as sm

    return "\n".join([
        "## Modelled H100 time from the sm_90 SASS (a MODEL, not a measurement)\n",
        "One `irt.optimal_sampling` call per row of the table (N rows of V logits, both models' logits in the "
        "same dtype, temperature 1, no reference, no log q output), every launch modelled from its compiled "
        "sm_90 SASS by `bench/sass_model.py` through `bench.h100.fused_model`. K = the method's search launches "
        "(kl_symmetry: the 6 Newton passes; snr: 7 SNR passes + 1 moments pass); every launch but the finalize "
        "reads each logits row once, so bytes / row per logits tensor = (K + 2) · V · itemsize (snr: 2 passes "
        "over the Newton budget (6 + 2) · V · itemsize of the cost table). Verdict per row: MODEL ≤ "
        f"{h100.ACCEPT_RATIO} × roofline (SPEC §13). Assumptions:\n",
        "```", sm.assumptions_text(), *("- " + a for a in MODEL_ASSUMPTIONS), "```\n",
        render_model(results),
        "\n### What the SASS says (per V-loop iteration of each specialization)\n",
        sass_table(kernel_rows), ""])


def write_model(results, kernel_rows, out_dir: str = RESULTS) -> str:
    from . import sass_model as sm

    text = model_text(results, kernel_rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sampling_model.md"), "w") as fh:
        fh.write("# irt.optimal_sampling: modelled H100 time\n\n`python -m bench.sampling --model`\n\n" + text)
    with open(os.path.join(out_dir, "sampling_model.json"), "w") as fh:
        json.dump({"note": "MODEL, not a measurement", "assumptions": sm.assumptions_text().splitlines()
                   + MODEL_ASSUMPTIONS, "results": results}, fh, indent=1, default=str)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", action="store_true", help="run the learning-speed experiment (minutes)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--aot", action="store_true", help="compile every specialization for sm_90 (minutes)")
    ap.add_argument("--model", action="store_true",
                    help="modelled H100 time from the sm_90 SASS (compiles ~50 specializations once: minutes)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        use_interpreter()
    from isreshape_triton import sampling as S

    os.makedirs(RESULTS, exist_ok=True)
    table, rows = cost_table()
    parts = ["# irt.optimal_sampling: cost per decode step\n",
             f"K = {S.NEWTON_PASSES} Newton passes for kl_symmetry (the last in fp64), {S.SNR_PASSES} SNR passes of "
             f"{S.SNR_POINTS} points + 1 moments pass for snr; every pass streams the policy and target rows once "
             "(snr also the reference rows when given). Budget column: (K + 2) · V · itemsize per logits tensor.\n",
             table, "\n## Measured launches and syncs\n", measured_counts()]
    if torch.cuda.is_available():
        parts += ["\n## GPU timings\n", gpu_timings()]
    if args.aot:
        parts += ["\n## sm_90 compile report\n", aot_table()]
    if args.model:
        parts += ["\n" + write_model(*h100_model())]
    text = "\n".join(parts) + "\n"
    print(text)
    with open(os.path.join(RESULTS, "sampling.md"), "w") as fh:
        fh.write(text)
    if args.experiment:
        from .sampling_experiment import run_experiment

        t0 = time.perf_counter()
        print("## Experiment\n\n" + run_experiment(args.seeds, args.steps, RESULTS))
        sys.stderr.write(f"experiment: {time.perf_counter() - t0:.0f} s\n")
    with open(os.path.join(RESULTS, "sampling.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
