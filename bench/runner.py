"""Runs every (family, dtype, size, implementation) and collects the figures.

Implementations: ``eager`` (bench/eager.py, what trainers run today),
``reference`` (``irt.reference.policy_loss``), ``fused`` (``irt.policy_loss`` on
tensors where ``irt.uses_kernels`` is true: CUDA, or CPU under
``TRITON_INTERPRET=1``) and, with a GPU, ``compiled`` (``torch.compile`` of the
reference).

Each run is one forward+backward step: ``loss, metrics = f(...)`` then
``loss.backward(seed)`` with the seed gradient made before counting (a trainer's
loss sum supplies it).  Figures per run:

* measured by counters (any machine): launches (Triton kernels + non-view aten
  ops), host syncs, aten-level bytes, peak extra memory (storages created inside
  the step, tracked by lifetime) — see ``isreshape_triton.dev.profiling``;
* fused bytes: the analytic ``isreshape_triton.launch.traffic_model`` (the whole
  fwd+bwd op; Triton kernels cannot be counted by a dispatch mode); the counted
  bytes of its aten glue are kept apart in ``aten_glue_bytes``;
* with CUDA: median fwd+bwd time (``triton.testing.do_bench``), achieved
  bandwidth (bytes / time) against a measured device-to-device copy, CUDA kernels
  seen by ``torch.profiler`` and ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import isreshape_triton as irt
from isreshape_triton.dev.profiling import LaunchCounter, count_work

from .data import Batch, make_batch
from .eager import EAGER

H100_BW = 3.35e12  # bytes/s, H100 SXM HBM3 datasheet
LAUNCH_S = 4e-6  # per-launch overhead assumed by the model
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Plan:
    mode: str
    device: str
    dtypes: List[str]
    sizes: List[tuple]  # eager / reference / compiled
    fused_sizes: List[tuple]  # fused (interpreter sizes on CPU)
    families: List[str]
    budget_s: float  # soft wall-clock budget of the whole run
    notes: List[str] = field(default_factory=list)


def make_plan(mode: str, device: str) -> Plan:
    families = list(irt.LOSS_TYPES)
    gpu = device == "cuda"
    if mode == "quick":
        sizes = [(16, 1024)]
        fused = [(16, 1024)] if gpu else [(4, 256)]
        plan = Plan(mode, device, ["fp32", "bf16"], sizes, fused, families, budget_s=50)
    else:
        sizes = [(16, 1024), (64, 4096), (1024, 4096)]
        # on a CPU the interpreter runs the fused op at the smallest size only: its counts do
        # not depend on the size, and the whole run stays under 5 minutes on 2 cores
        fused = sizes if gpu else [(16, 1024)]
        plan = Plan(mode, device, ["fp32", "bf16"], sizes, fused, families, budget_s=400)
    if not gpu:
        plan.notes.append(
            "No CUDA device: the fused op runs its Triton kernels in the CPU interpreter "
            "(TRITON_INTERPRET=1) at B×T = " + ", ".join(f"{b}×{t}" for b, t in plan.fused_sizes)
            + " only (the interpreter runs each program instance in NumPy, far slower than a GPU); its "
            "launch and sync counts do not depend on the size, and its bytes come from the analytic "
            "traffic model `isreshape_triton.launch.traffic_model`. Eager and reference run at every size.")
        plan.notes.append("No CUDA device: no timings; torch.compile baseline skipped (GPU only).")
    return plan


# ----------------------------------------------------------------------------- implementations

def _eager(family):
    fn = EAGER[family]
    return lambda lp, old, adv, mask: fn(lp, old, adv, mask, "token-mean")


def _reference(family):
    ref = irt.reference.policy_loss  # AttributeError while the reference is missing
    return lambda lp, old, adv, mask: ref(lp, old, adv, mask, loss_type=family, loss_agg_mode="token-mean")


def _fused(family):
    def run(lp, old, adv, mask):
        if not irt.uses_kernels(lp):
            raise RuntimeError("irt.uses_kernels() is false for these tensors")
        return irt.policy_loss(lp, old, adv, mask, loss_type=family, loss_agg_mode="token-mean")
    return run


_COMPILED: Dict[str, Callable] = {}


def _compiled(family):
    if family not in _COMPILED:
        _COMPILED[family] = torch.compile(_reference(family), dynamic=False)
    return _COMPILED[family]


IMPLS = {"eager": _eager, "reference": _reference, "fused": _fused, "compiled": _compiled}


def traffic_model_bytes(family, batch: Batch, split: bool = False):
    """``isreshape_triton.launch.traffic_model`` of the batch; ``split``: (per-token streams, the
    O(rows + chunks + programs) record buffers)."""
    try:
        from isreshape_triton.launch import traffic_model
    except ImportError:
        return None
    B, T = batch.shape
    adv = batch.advantages
    adv_shape = "none" if adv is None else ("B" if adv.dim() == 1 else "BT")
    mask_dtype = None if batch.response_mask is None else batch.response_mask.dtype
    out = traffic_model(family, batch.log_prob.dtype, mask_dtype, B, T, adv_shape, split=split)
    return tuple(int(x) for x in out) if split else int(out)


# ----------------------------------------------------------------------------- measuring

_SEEDS: Dict[tuple, torch.Tensor] = {}


def _seed(dtype, device):
    key = (dtype, str(device))
    if key not in _SEEDS:
        _SEEDS[key] = torch.ones((), dtype=dtype, device=device)
    return _SEEDS[key]


def _prepare_seeds(device):
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        _seed(dt, device)


def _step(fn, batch: Batch):
    batch.log_prob.grad = None
    loss, metrics = fn(batch.log_prob, batch.old_log_prob, batch.advantages, batch.response_mask)
    loss.backward(_seed(loss.dtype, loss.device))
    return loss, metrics


def _cuda_profile(fn, batch) -> dict:
    """Kernels counted by torch.profiler and syncs reported by CUDA sync-debug mode."""
    import warnings
    from torch.profiler import ProfilerActivity, profile
    out = {}
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _step(fn, batch)
            torch.cuda.synchronize()
        out["cuda_kernels"] = sum(1 for e in prof.events()
                                  if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001
        out["cuda_kernels_error"] = repr(e)[:200]
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _step(fn, batch)
        out["cuda_syncs"] = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    except Exception as e:  # noqa: BLE001
        out["cuda_syncs_error"] = repr(e)[:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return out


def measure(impl: str, family: str, batch: Batch, gpu: bool) -> dict:
    """One run: counts always, plus GPU timing/memory when ``gpu``."""
    B, T = batch.shape
    row = {"impl": impl, "family": family, "dtype": str(batch.log_prob.dtype).replace("torch.", ""),
           "B": B, "T": T, "positions": batch.positions, "counted_tokens": batch.counted}
    try:
        fn = IMPLS[impl](family)
        if gpu or impl == "fused":  # warm-up: JIT compile, autotune, torch.compile, and the fused
            _step(fn, batch)          # op's once-per-process completion ticket (not a per-step launch)
            if gpu:
                torch.cuda.synchronize()
        t0 = time.perf_counter()
        if impl == "compiled":  # Inductor's own kernels: Triton launches only, no dispatch mode
            with LaunchCounter() as lc:
                loss, _ = _step(fn, batch)
            row.update(triton_launches=lc.launches, torch_launches=None, launches=lc.launches,
                       syncs=None, torch_bytes=None, peak_bytes=None, kernels=sorted(set(lc.kernels)))
        else:
            with count_work() as w:
                loss, _ = _step(fn, batch)
            row.update(triton_launches=w.triton_launches, torch_launches=w.torch_launches,
                       launches=w.launches, syncs=w.syncs, torch_bytes=w.bytes, peak_bytes=w.peak_bytes,
                       allocs=w.allocs, kernels=w.kernels, sync_ops=w.ops.sync_ops,
                       torch_ops=dict(Counter(w.ops.ops)))
        row["cpu_wall_s"] = time.perf_counter() - t0
        row["loss"] = float(loss.detach())
        row["_grad"] = batch.log_prob.grad.detach().float().clone()
        if impl == "fused":
            model = traffic_model_bytes(family, batch)
            # the model covers the whole fwd+bwd op (its Triton kernels and its aten glue, e.g. the
            # backward multiply), so the counted aten bytes are kept apart, not added
            row["model_bytes"] = model
            if model is not None:  # per-token streams, without the O(rows + chunks + programs) record buffers
                B, T = batch.shape
                row["stream_bytes_per_token"] = traffic_model_bytes(family, batch, split=True)[0] / (B * T)
            row["aten_glue_bytes"] = row["torch_bytes"]
            row["bytes"] = model
            row["bytes_source"] = "traffic_model" if model is not None else "n/a (no traffic_model)"
        else:
            row["bytes"] = row["torch_bytes"]
            row["bytes_source"] = "n/a (Inductor)" if impl == "compiled" else "TorchDispatchMode"
        if gpu:
            row.update(_gpu_figures(fn, batch, row))
            if impl == "compiled" and row.get("cuda_kernels") is not None:
                # Inductor may launch through its own static launcher, unseen by the Triton hook
                row["launches"] = row["cuda_kernels"]
                row["launches_source"] = "CUDA kernels, torch.profiler"
        row["status"] = "ok"
    except (ImportError, ModuleNotFoundError) as e:
        row["status"] = f"{impl} unavailable ({type(e).__name__}: {e})"
    except AttributeError as e:
        if impl in ("reference", "compiled") and "policy_loss" in str(e):
            row["status"] = f"{impl} unavailable (irt.reference.policy_loss missing)"
        else:
            row["status"] = f"error: {type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=6)
    except Exception as e:  # noqa: BLE001 - a failing implementation must not stop the bench
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        row["traceback"] = traceback.format_exc(limit=6)
    per = batch.positions
    for key in ("bytes", "peak_bytes"):
        value = row.get(key)
        row[key + "_per_token"] = None if value is None else value / per
    row["h100_model_us"] = h100_model_us(row)
    return row


def h100_model_us(row, positions: Optional[int] = None) -> Optional[float]:
    """Model, not a measurement: bytes / 3.35 TB/s + launches × 4 µs (optionally rescaled)."""
    if row.get("bytes_per_token") is None or row.get("launches") is None:
        return None
    n = positions if positions is not None else row["positions"]
    return (row["bytes_per_token"] * n / H100_BW + row["launches"] * LAUNCH_S) * 1e6


def _gpu_figures(fn, batch, row) -> dict:
    from triton.testing import do_bench
    out = {}
    torch.cuda.synchronize()
    batch.log_prob.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(fn, batch)
    torch.cuda.synchronize()
    out["cuda_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    ms = do_bench(lambda: _step(fn, batch), grad_to_none=[batch.log_prob], return_mode="median")
    out["gpu_median_ms"] = ms
    if row.get("bytes"):
        out["achieved_GBps"] = row["bytes"] / (ms * 1e-3) / 1e9
    out.update(_cuda_profile(fn, batch))
    return out


_COPY_BW: Optional[float] = None


def copy_bandwidth_GBps() -> float:
    """Device-to-device copy bandwidth (read + write bytes / median time)."""
    global _COPY_BW
    if _COPY_BW is None:
        from triton.testing import do_bench
        x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        ms = do_bench(lambda: y.copy_(x), return_mode="median")
        _COPY_BW = 2 * x.numel() / (ms * 1e-3) / 1e9
    return _COPY_BW


# ----------------------------------------------------------------------------- the sweep

class Progress:
    """One status line per step on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int, budget_s: float):
        self.total, self.done, self.t0, self.budget = total, 0, time.perf_counter(), budget_s
        self.tty = sys.stderr.isatty()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, label: str) -> None:
        self.done += 1
        end = "\r" if self.tty else "\n"
        sys.stderr.write(f"[{self.done:3d}/{self.total}] {self.elapsed:6.1f}s  {label:<60}{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run_plan(plan: Plan) -> List[dict]:
    gpu = plan.device == "cuda"
    impls = ["eager", "reference", "fused"] + (["compiled"] if gpu else [])
    jobs = []  # smallest sizes first, so that a time budget cuts the largest interpreter runs
    for size in sorted(set(plan.sizes) | set(plan.fused_sizes), key=lambda s: (s[0] * s[1], s)):
        for dname in plan.dtypes:
            for family in plan.families:
                for impl in impls:
                    # eager/reference also run at the fused sizes: same batch, for the agreement check
                    wanted = plan.fused_sizes if impl == "fused" else set(plan.sizes) | set(plan.fused_sizes)
                    if size in wanted and (impl != "compiled" or size in plan.sizes):
                        jobs.append((dname, size, family, impl))
    _prepare_seeds(plan.device)
    progress = Progress(len(jobs), plan.budget_s)
    rows, batches = [], {}
    fused_rate: Optional[float] = None  # interpreter seconds per position (slowest seen)
    for dname, size, family, impl in jobs:
        key = (dname, size)
        if key not in batches:
            batches.clear()
            batches[key] = make_batch(*size, dtype=DTYPES[dname], device=plan.device)
        batch = batches[key]
        label = f"{impl:<9} {family:<15} {dname} {size[0]}×{size[1]}"
        if impl == "fused" and not gpu and fused_rate is not None:
            # keep 15 % of the budget for the eager/reference runs (fast: < 1 s each at 4M tokens)
            projected = fused_rate * batch.positions
            if progress.elapsed + projected > 0.85 * plan.budget_s:
                rows.append({"impl": impl, "family": family, "dtype": str(DTYPES[dname]).replace("torch.", ""),
                             "B": size[0], "T": size[1], "positions": batch.positions,
                             "status": f"skipped (interpreter time budget; projected {projected:.0f}s)"})
                progress.step(label + "  skipped (time budget)")
                continue
        row = measure(impl, family, batch, gpu)
        if impl == "fused" and row["status"] == "ok":
            r = row["cpu_wall_s"] / batch.positions
            fused_rate = r if fused_rate is None else max(fused_rate, r)
        rows.append(row)
        progress.step(label + ("" if row["status"] == "ok" else "  " + row["status"][:40]))
    progress.close()
    _attach_agreement(rows)
    return rows


def _attach_agreement(rows: List[dict]) -> None:
    """Relative difference of loss and gradient against the reference of the same batch."""
    refs = {(r["family"], r["dtype"], r["B"], r["T"]): r for r in rows
            if r["impl"] == "reference" and r.get("status") == "ok"}
    for r in rows:
        ref = refs.get((r["family"], r["dtype"], r["B"], r["T"]))
        if r.get("status") == "ok" and ref is not None and r is not ref:
            dl = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
            g, gr = r["_grad"], ref["_grad"]
            dg = float((g - gr).abs().max() / gr.abs().max().clamp_min(1e-30))
            r["rel_diff_vs_reference"] = {"loss": dl, "grad": dg}
    for r in rows:
        r.pop("_grad", None)


def environment(plan: Plan) -> dict:
    import platform
    info = {"mode": plan.mode, "device": plan.device, "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if plan.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["copy_bandwidth_GBps"] = copy_bandwidth_GBps()
    return info
