"""``python -m bench.sampling [--experiment] [--aot]``: what one call of ``irt.optimal_sampling``
costs per decode step (bench/results/sampling.md), and (``--experiment``) the learning-speed
experiment of issue 11 (bench/results/sampling_experiment.{md,png,json}).

Cost table (machine-independent): launches, streaming passes, bytes per row read from the logits
against the budget (Newton iterations + 2) × V × itemsize per logits tensor, the fp64 record
traffic (L2-resident), programs per launch, and an H100 *model* time (bytes / 3.35 TB/s +
4 µs × launches; not a measurement). The launch and sync counts are also measured by running the
op once (interpreter on a CPU). ``--aot`` compiles every specialization for sm_90 and prints
registers and spills. With CUDA the op is timed with ``triton.testing.do_bench``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

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
    from isreshape_triton.profiling import count_work

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

    from isreshape_triton import aot
    from isreshape_triton import sampling as S

    rows = aot.run_in_subprocess(S.default_specs(), Path(RESULTS) / "sampling_aot.json")
    lines = ["| kernel | specializations | errors | registers (min–max) | spill bytes |", "|---|---|---|---|---|"]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        ks = [r for r in rows if r["kernel"] == kernel]
        ok = [r for r in ks if "error" not in r]
        regs = [r["registers"] for r in ok] or [0]
        spills = sum(r["spill_stores"] + r["spill_loads"] for r in ok)
        lines.append(f"| {kernel.split(':')[1]} | {len(ks)} | {len(ks) - len(ok)} | {min(regs)}–{max(regs)} | {spills} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", action="store_true", help="run the learning-speed experiment (minutes)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--aot", action="store_true", help="compile every specialization for sm_90 (minutes)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
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
