"""``python -m bench [--quick]``: cost counts always, GPU timings when CUDA is present.

Writes a markdown table to stdout (and bench/results/latest.md), the raw figures
to bench/results/latest.json and a plot to bench/results/latest.png. The full mode
(or ``--model``) adds the modelled H100 time read from the sm_90 SASS
(``bench/h100.py``): a section of latest.md, bench/results/model.json and model.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _select_device(requested: str) -> str:
    import torch  # torch does not import triton; the interpreter flag is read when triton loads

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # run the fused kernels in the interpreter
    return requested


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes only (< 60 s on a CPU; used by tests)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--families", default=None, help="comma-separated subset of irt.LOSS_TYPES")
    parser.add_argument("--dtypes", default=None, help="comma-separated subset of fp32,bf16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="results folder (default: bench/results)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--aot", action="store_true",
                        help="recompile every kernel specialization for sm_90 and rewrite the report")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=None,
                        help="modelled H100 time from the sm_90 SASS (default: on, off with --quick)")
    args = parser.parse_args(argv)

    device = _select_device(args.device)
    from . import report, runner  # imports triton / isreshape_triton: after the env is set

    plan = runner.make_plan("quick" if args.quick else "full", device)
    if args.families:
        plan.families = [f for f in args.families.split(",") if f]
    if args.dtypes:
        plan.dtypes = [d for d in args.dtypes.split(",") if d]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    sys.stderr.write(f"bench: {plan.mode} mode on {device}; soft budget {plan.budget_s:.0f} s\n")
    env = runner.environment(plan)
    rows = runner.run_plan(plan)
    aot = report.aot_report(regenerate=args.aot)
    model_text = ""
    if args.model if args.model is not None else not args.quick:
        from . import h100
        sys.stderr.write("bench: modelled H100 time from the sm_90 SASS (compiled specializations are cached)\n")
        try:
            model_text, _ = h100.run(plan.families, ["fp32"], args.out)
        except Exception as e:  # noqa: BLE001 - reported, the measured counts still stand
            model_text = f"## Modelled H100 time\n\nNot available: {type(e).__name__}: {str(e)[:500]}\n"
    wall = time.perf_counter() - t0
    text = report.render(plan, env, rows, aot, wall) + ("\n" + model_text if model_text else "")
    print(text)
    with open(os.path.join(args.out, "latest.md"), "w") as fh:
        fh.write(text)
    report.write_json(os.path.join(args.out, "latest.json"), plan, env, rows, aot, wall)
    if not args.no_plot:
        report.plot(rows, os.path.join(args.out, "latest.png"), device == "cuda")
    extra = ", model.json, model.png" if model_text else ""
    sys.stderr.write(f"bench: wrote {args.out}/latest.json, latest.png, latest.md{extra} in {wall:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
