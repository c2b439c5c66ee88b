"""``python -m bench [--quick]``: cost counts always, GPU timings when CUDA is present.

Writes a markdown table to stdout and, under ``--out`` (default ``bench/out/``, untracked),
latest.md, the raw figures in latest.json and a plot in latest.png. The full mode (or
``--model``) adds the modelled H100 time read from the sm_90 SASS (``bench/h100.py``): a
section of latest.md, model.json and model.png. The committed figures in ``bench/results/``
are regenerated only on purpose: ``python -m bench --out bench/results``.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from . import use_interpreter

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "out")  # untracked (.gitignore); bench/results holds the committed figures
NO_CUDA = ("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
           "use --device cpu")


class _Heartbeat:
    """Stands in for sys.stderr: forwards every write and, from a daemon thread, writes
    "still running" when nothing has been written for ``every`` seconds, so a long step
    (an interpreter run, the sm_90 compile of the model) is never silent."""

    def __init__(self, stream, every: float = 15.0):
        self._stream, self._every = stream, every
        self._last, self._ended_line = time.monotonic(), True
        self._t0, self.phase = time.monotonic(), "starting"
        self._lock, self._stop = threading.Lock(), threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def stop(self):
        self._stop.set()

    def write(self, text):
        with self._lock:
            self._last = time.monotonic()
            if text:
                self._ended_line = text.endswith("\n")
            return self._stream.write(text)

    def flush(self):
        return self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)

    def _beat(self):
        while not self._stop.wait(1.0):
            with self._lock:
                now = time.monotonic()
                if now - self._last < self._every:
                    continue
                self._stream.write(("" if self._ended_line else "\n")
                                   + f"bench: {self.phase}: still running ({now - self._t0:.0f} s so far)\n")
                self._stream.flush()
                self._last, self._ended_line = now, True


def _select_device(requested: str):
    """The device to run on ("cpu" sets TRITON_INTERPRET=1 before triton loads); None when
    "cuda" is asked for and torch sees no GPU."""
    import torch  # torch does not import triton; the interpreter flag is read when triton loads

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        return None
    if requested == "cpu":
        use_interpreter()  # run the fused kernels in the interpreter
    return requested


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (< 60 s on a CPU; used by tests)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): cuda when torch sees a GPU, else cpu (the Triton interpreter)")
    parser.add_argument("--families", default=None, help="comma-separated subset of irt.LOSS_TYPES")
    parser.add_argument("--dtypes", default=None, help="comma-separated subset of fp32,bf16")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="results folder (default: bench/out, untracked); "
                             "--out bench/results rewrites the committed figures")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--aot", action="store_true",
                        help="recompile every kernel specialization for sm_90 and rewrite the report")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=None,
                        help="modelled H100 time from the sm_90 SASS (default: on, off with --quick)")
    args = parser.parse_args(argv)

    beat = sys.stderr = _Heartbeat(sys.stderr)
    try:
        return _run(args, parser, beat)
    finally:
        beat.stop()
        sys.stderr = beat._stream


def _run(args, parser, beat) -> int:
    beat.write("bench: loading torch\n")
    beat.phase = "loading torch"
    device = _select_device(args.device)
    if device is None:
        parser.exit(2, f"{parser.prog}: error: {NO_CUDA}\n")
    beat.write(f"bench: loading triton and isreshape_triton ({'CPU: Triton interpreter' if device == 'cpu' else device})\n")
    beat.phase = "loading triton"
    from . import report, runner  # imports triton / isreshape_triton: after the env is set

    plan = runner.make_plan("quick" if args.quick else "full", device)
    if args.families:
        plan.families = [f for f in args.families.split(",") if f]
    if args.dtypes:
        plan.dtypes = [d for d in args.dtypes.split(",") if d]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    beat.write(f"bench: {plan.mode} mode on {device}; soft budget {plan.budget_s:.0f} s; writing to {args.out}\n")
    beat.phase = "environment"
    env = runner.environment(plan)
    beat.phase = "cost counts (eager / reference / fused)"
    rows = runner.run_plan(plan)
    beat.phase = "sm_90 compile report"
    aot = report.aot_report(regenerate=args.aot)
    model_text = ""
    if args.model if args.model is not None else not args.quick:
        from . import h100
        beat.write("bench: modelled H100 time from the sm_90 SASS (compiled specializations are cached)\n")
        beat.phase = "H100 model (sm_90 compile, then the model)"
        try:
            model_text, _ = h100.run(plan.families, ["fp32"], args.out, log=beat)
        except Exception as e:  # noqa: BLE001 - reported, the measured counts still stand
            model_text = f"## Modelled H100 time\n\nNot available: {type(e).__name__}: {str(e)[:500]}\n"
    beat.phase = "writing the report"
    wall = time.perf_counter() - t0
    text = report.render(plan, env, rows, aot, wall) + ("\n" + model_text if model_text else "")
    print(text)
    with open(os.path.join(args.out, "latest.md"), "w") as fh:
        fh.write(text)
    report.write_json(os.path.join(args.out, "latest.json"), plan, env, rows, aot, wall)
    if not args.no_plot:
        report.plot(rows, os.path.join(args.out, "latest.png"), device == "cuda")
    extra = ", model.json, model.png" if model_text else ""
    beat.write(f"bench: wrote {args.out}/latest.json, latest.png, latest.md{extra} in {wall:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
