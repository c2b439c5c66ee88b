"""``python -m bench.gpu_check [--dry-run] [--out DIR]``: correctness and timings on a CUDA GPU.

``./run.sh gpu-check`` runs it. On one H100 it takes under 8 minutes and writes
``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.png`` to ``bench/results/gpu/`` (or
``--out DIR``). First ``--jobs`` processes (8) run a share of the kernel launches each, so that
Triton's disk cache holds every compiled kernel before the checks (the JIT compiles one kernel at
a time); no timing starts after the soft budget ``--budget-s`` (390 s; a ``torch.compile`` job
needs 90 s left).

Checks (each records pass / fail / skipped / error, the largest absolute error and the worst
error as a fraction of its tolerance; an exception is recorded and the next check runs; the
exit status is 1 if any check failed or raised):

* ``policy_loss``: every family × aggregation mode × dtype (fp32, bf16) against
  ``irt.reference.policy_loss`` computed in float64 from the same inputs: loss, the gradient
  of log_prob and every metric (tolerances of tests/test_kernels.py);
* ``packed``: every family on a packed batch (``cu_seqlens``), the aggregation modes in turn;
* ``from_logits``: ``irt.policy_loss_from_logits`` with an entropy bonus (loss, metrics,
  entropy, grad_logits) and ``irt.selective_log_softmax`` (log_prob, entropy, their gradient);
* ``sampling``: ``irt.optimal_sampling``, both methods, against ``irt.reference.optimal_sampling``
  (α, the bound flags, the KLs, log q* and the log-probs at the drawn token; tests/test_sampling.py);
* ``cuda_graph``: a forward + backward captured in a ``torch.cuda.CUDAGraph``, replayed on new
  values copied into the static inputs, equal bit for bit to an eager call;
* ``repeatable``: the same call twice gives the same bits (loss, gradient, metrics);
* ``compile``: the README's ``torch.compile(fullgraph=True)`` snippet with the inductor backend,
  compiled against eager (``aot_eager`` on the CPU).

Timings: ``triton.testing.do_bench`` (median) of forward + backward at the bench shapes of
``bench/h100.py`` for the fused op, the eager trainer code (``bench/eager.py``), ``torch.compile``
of that code and Liger-Kernel's ``triton_grpo_loss`` (ppo_clip, where importable); beside each
fused time the SASS model's prediction (``bench/results/model.json``; fp32 rows only) and its
error, measured / model − 1, and the model's roofline. Timed: the fused op for every family
(fp32, and bf16 for ``KEY_FAMILIES``), the eager code for every family, ``torch.compile`` of it
for ``KEY_FAMILIES`` first and the other families while the budget lasts.

``--dry-run`` runs the same script on the CPU under the Triton interpreter at tiny shapes (CUDA
graphs skipped, one timed call instead of ``do_bench``): the same JSON / markdown schema, in
well under 3 minutes (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

from . import use_interpreter

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu"
README = Path(__file__).resolve().parent.parent / "README.md"
MODEL_JSON = Path(__file__).resolve().parent / "results" / "model.json"
README_SNIPPET_MARKER = "<!-- tested: tests/test_compile.py::test_readme_snippet -->"

# Tolerances of the test suite (tests/test_kernels.py, tests/test_from_logits.py,
# tests/test_sampling.py), here against a float64 reference.
VALUE_RTOL = 1e-5  # loss, metrics, entropy, log_prob (fp32 outputs whatever the input dtype)
GRAD_RTOL = {"fp32": 1e-5, "bf16": 8e-3}  # gradients come back in the input dtype
ALPHA_TOL = {"kl_symmetry": 1e-6, "snr": 1e-4}
KL_TOL = 1e-6
LOG_Q_TOL = 1e-4
TOKEN_LOG_PROB_TOL = 2e-5

ENTROPY_BONUS = 0.01
LOGITS_TEMPERATURE = 0.7
LIGER_V = 1  # Liger's op reads logits [B, T+1, V]: at V = 1 it reads one value per token, like a log-prob


# ----------------------------------------------------------------------------- settings

@dataclass
class Settings:
    """What one run does: the device and every size."""
    device: str
    dry_run: bool
    check_shape: tuple  # (B, T) of the policy_loss checks
    packed_lengths: tuple  # sequence lengths of the packed checks
    logits_checks: list  # (family, dtype, N tokens, V)
    sampling_shape: tuple  # (rows, V)
    cases: list  # h100.Case: the timing shapes
    warmup_ms: int = 10
    rep_ms: int = 50
    budget_s: float = 390.0  # soft: no timing starts once the run has taken this long
    compile_backend: str = "inductor"  # of torch.compile (the README snippet, the eager code); CPU: aot_eager

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def make_settings(dry_run: bool, device: str, budget_s: Optional[float]) -> Settings:
    import torch

    from . import h100

    if dry_run:
        lengths = (5, 17, 11)
        cases = [h100.Case("2 × 33", 2, 33),
                 h100.Case(f"packed {len(lengths)} seqs, {sum(lengths)} tokens", len(lengths),
                           math.ceil(sum(lengths) / len(lengths)), lengths)]
        s = Settings(device, True, (2, 33), lengths,
                     [("is_reshape", "fp32", 6, 37), ("ppo_clip", "bf16", 4, 300)], (3, 50), cases,
                     budget_s=150.0)
    else:
        g = torch.Generator().manual_seed(1)
        lengths = tuple(int(x) for x in torch.randint(1, 3001, (12,), generator=g))
        s = Settings(device, False, (16, 1000), lengths,
                     [("is_reshape", "fp32", 1024, 4096), ("ppo_clip", "bf16", 128, 32768),
                      ("vespo", "fp32", 128, 32768), ("is_reshape_sign", "bf16", 1024, 4096)],
                     (16, 32768), h100.cases())
    if budget_s is not None:
        s.budget_s = budget_s
    if not s.cuda:
        s.compile_backend = "aot_eager"  # inductor's C++ build takes about a minute per graph on a CPU
    return s


# ----------------------------------------------------------------------------- comparisons

@dataclass
class Diff:
    """One compared quantity: its largest absolute error and that error over its tolerance
    (≤ 1 passes; a mismatch of NaN / inf positions is inf)."""
    name: str
    max_abs: float
    ratio: float


def close(name: str, got, want, rtol: float, atol: float) -> Diff:
    """``got`` against ``want`` elementwise in float64: |got − want| ≤ atol + rtol·|want|."""
    import torch

    got, want = torch.as_tensor(got).detach().double().cpu(), torch.as_tensor(want).detach().double().cpu()
    if got.shape != want.shape:
        return Diff(f"{name} (shape {tuple(got.shape)} vs {tuple(want.shape)})", math.inf, math.inf)
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(got[~finite].nan_to_num(),
                                                                       want[~finite].nan_to_num()):
        return Diff(f"{name} (non-finite pattern)", math.inf, math.inf)
    if not finite.any():
        return Diff(name, 0.0, 0.0)
    err = (got[finite] - want[finite]).abs()
    ratio = torch.where(err == 0, 0.0, err / (atol + rtol * want[finite].abs()))  # 0/0: equal
    return Diff(name, float(err.max()), float(ratio.max()))


def bitwise(name: str, a, b) -> Diff:
    """Equal bits (NaN payloads included), or inf."""
    import torch

    a, b = a.detach(), b.detach()
    if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                 b.reshape(-1).view(torch.uint8)):
        return Diff(name, 0.0, 0.0)
    err = float((a.double() - b.double()).abs().nan_to_num(math.inf).max()) \
        if a.shape == b.shape and a.numel() else math.inf
    return Diff(name, err, math.inf)


def grad_diff(name: str, got, want, dtype_name: str) -> Diff:
    """Gradient tolerance of the test suite: rtol, and atol = rtol·(1e-3 + max |reference|)."""
    rtol = GRAD_RTOL[dtype_name]
    scale = float(want.abs().max()) if want.numel() else 0.0
    return close(name, got, want, rtol, rtol * (1e-3 + scale))


def metric_diffs(metrics: dict, reference: dict) -> List[Diff]:
    out = [Diff(f"metric names {sorted(set(metrics) ^ set(reference))}", math.inf, math.inf)] \
        if set(metrics) != set(reference) else []
    return out + [close(f"metrics.{k}", metrics[k], reference[k], VALUE_RTOL, VALUE_RTOL)
                  for k in sorted(set(metrics) & set(reference))]


def loss_diff(loss, reference) -> Diff:
    return close("loss", loss, reference, VALUE_RTOL, VALUE_RTOL * (1 + abs(float(reference))))


# ----------------------------------------------------------------------------- checks

@dataclass
class Check:
    group: str
    name: str
    status: str  # pass | fail | skipped | error
    max_abs_err: Optional[float] = None
    worst: Optional[str] = None  # the quantity with the largest error / tolerance
    tol_ratio: Optional[float] = None  # that ratio: ≤ 1 passes
    seconds: float = 0.0
    detail: str = ""


class Skip(Exception):
    """Raised by a check that cannot run here (recorded as skipped, with the reason)."""


def run_check(group: str, name: str, fn: Callable[[], List[Diff]], log=sys.stderr) -> Check:
    t0 = time.perf_counter()
    try:
        diffs = fn()
    except Skip as e:
        check = Check(group, name, "skipped", detail=str(e))
    except Exception as e:  # noqa: BLE001 - recorded, the next check runs
        tb = traceback.extract_tb(e.__traceback__)[-1]
        check = Check(group, name, "error", detail=f"{type(e).__name__}: {e} "
                                                  f"({os.path.basename(tb.filename)}:{tb.lineno})"[:500])
    else:
        worst = max(diffs, key=lambda d: d.ratio)
        ok = all(d.ratio <= 1.0 for d in diffs)
        check = Check(group, name, "pass" if ok else "fail", max(d.max_abs for d in diffs), worst.name,
                      worst.ratio, detail="" if ok else "; ".join(f"{d.name}: |err| {d.max_abs:.3g}, "
                                                                  f"{d.ratio:.3g}× tol"
                                                                  for d in diffs if d.ratio > 1.0)[:500])
    check.seconds = time.perf_counter() - t0
    log.write(f"gpu_check: [{check.status}] {group}: {name} ({check.seconds:.1f} s)"
              f"{' ' + check.detail if check.detail else ''}\n")
    return check


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _fused_step(log_prob, *args, **kwargs):
    """(loss, metrics, grad) of one fused forward + backward on a fresh leaf."""
    import isreshape_triton as irt

    x = log_prob.detach().clone().requires_grad_()
    loss, metrics = irt.policy_loss(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), metrics, x.grad


def _reference_step(log_prob, old, adv, mask, *args, **kwargs):
    """The same on float64 copies of the inputs with ``irt.reference``."""
    import isreshape_triton as irt

    x = log_prob.detach().double().requires_grad_()
    loss, metrics = irt.reference.policy_loss(x, old.double(), None if adv is None else adv.double(), mask,
                                              *args, **kwargs)
    loss.backward()
    return loss.detach(), metrics, x.grad


def _batch(s: Settings, dtype_name: str, seed: int = 0):
    """(log_prob, old, advantages, mask) of the bench batch (bench/data.py) at the check shape."""
    from .data import make_batch

    b = make_batch(*s.check_shape, dtype=_dtype(dtype_name), device=s.device, seed=seed)
    return b.log_prob.detach(), b.old_log_prob, b.advantages, b.response_mask


def _compare_with_reference(inputs, dtype_name, *args, **kwargs) -> List[Diff]:
    loss, metrics, grad = _fused_step(*inputs, *args, **kwargs)
    r_loss, r_metrics, r_grad = _reference_step(*inputs, *args, **kwargs)
    return [loss_diff(loss, r_loss), grad_diff("grad", grad, r_grad, dtype_name)] + metric_diffs(metrics, r_metrics)


def check_policy_loss(s: Settings, family: str, agg: str, dtype_name: str) -> List[Diff]:
    return _compare_with_reference(_batch(s, dtype_name), dtype_name, family, agg)


def _packed_case(s: Settings):
    from . import h100

    L = s.packed_lengths
    return h100.Case("packed", len(L), math.ceil(sum(L) / len(L)), L)


def check_packed(s: Settings, family: str, agg: str) -> List[Diff]:
    from . import h100

    lp, old, adv, mask, extra = h100.case_inputs(_packed_case(s), _dtype("fp32"), s.device)
    return _compare_with_reference((lp, old, adv, mask), "fp32", family, agg, **extra)


def check_from_logits(s: Settings, family: str, dtype_name: str, N: int, V: int) -> List[Diff]:
    """Loss with an entropy bonus: loss, metrics, entropy and grad_logits against the reference."""
    import isreshape_triton as irt

    from .from_logits import _batch as logits_batch

    logits, labels, old, adv, mask = logits_batch(N, V, _dtype(dtype_name), s.device)
    m = mask.float()

    def step(op, x):
        loss, metrics, entropy = op(x, labels, old, adv, mask, family, temperature=LOGITS_TEMPERATURE,
                                    return_entropy=True)
        (loss - ENTROPY_BONUS * (entropy * m).sum() / m.sum()).backward()
        return loss.detach(), metrics, entropy.detach()

    x, x_ref = logits.clone().requires_grad_(), logits.double().requires_grad_()
    loss, metrics, entropy = step(irt.policy_loss_from_logits, x)
    r_loss, r_metrics, r_entropy = step(irt.reference.policy_loss_from_logits, x_ref)
    return [loss_diff(loss, r_loss), close("entropy", entropy, r_entropy, VALUE_RTOL, VALUE_RTOL),
            grad_diff("grad_logits", x.grad, x_ref.grad, dtype_name)] + metric_diffs(metrics, r_metrics)


def check_selective_log_softmax(s: Settings, dtype_name: str, N: int, V: int) -> List[Diff]:
    """log_prob and entropy, and the gradient of a weighted sum of both, against the reference."""
    import torch

    import isreshape_triton as irt

    from .from_logits import _batch as logits_batch

    logits, labels, _, _, _ = logits_batch(N, V, _dtype(dtype_name), s.device)
    labels = labels.clamp(min=0)  # no mask here: every label is used
    g = torch.Generator().manual_seed(5)
    w_lp, w_ent = (torch.randn(labels.shape, generator=g).to(s.device) for _ in range(2))
    out = []
    x, x_ref = logits.clone().requires_grad_(), logits.double().requires_grad_()
    lp, ent = irt.selective_log_softmax(x, labels, LOGITS_TEMPERATURE)
    r_lp, r_ent = irt.reference.selective_log_softmax(x_ref, labels, LOGITS_TEMPERATURE)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    ((r_lp * w_lp.double()).sum() + (r_ent * w_ent.double()).sum()).backward()
    out += [close("log_prob", lp, r_lp, VALUE_RTOL, VALUE_RTOL), close("entropy", ent, r_ent, VALUE_RTOL, VALUE_RTOL),
            grad_diff("grad_logits", x.grad, x_ref.grad, dtype_name)]
    return out


def _sampling_rows(s: Settings):
    """(policy, target, reference) logits: close rows (an interior KL-symmetry root) and a top-k
    truncated target on the last row (−inf logits)."""
    import torch

    n, V = s.sampling_shape
    g = torch.Generator().manual_seed(3)
    a = 2.0 * torch.randn(n, V, generator=g)
    b = a + torch.randn(n, V, generator=g)
    k = max(2, V // 8)
    b[-1] = b[-1].masked_fill(b[-1] < b[-1].topk(k).values[-1], -math.inf)
    ref = b + 0.3 * torch.randn(n, V, generator=g)
    return a, b, ref


def check_sampling(s: Settings, method: str) -> List[Diff]:
    """α (and the bound flags), KL(q‖π_θ), KL(q‖π_t), log q* over the vocabulary and the
    log-probs at the drawn token against the float64 reference on the CPU. SNR: the KLs are
    compared with the reference at the kernel's α, row by row (tests/test_sampling.py)."""
    import torch

    import isreshape_triton as irt

    a, b, ref = _sampling_rows(s)
    ref_logits = ref if method == "snr" else None
    dev = [t.to(s.device) if t is not None else None for t in (a, b, ref_logits)]
    r = irt.optimal_sampling(*dev[:2], method=method, ref_logits=dev[2], return_log_q=True,
                             generator=torch.Generator(device=s.device).manual_seed(0))
    f = irt.reference.optimal_sampling(a, b, method=method, ref_logits=ref_logits, return_log_q=True)
    tol = ALPHA_TOL[method]
    out = [close("alpha", r.alpha, f.alpha, 0.0, tol),
           Diff("alpha_at_bound", 0.0, 0.0 if torch.equal(r.alpha_at_bound.cpu(), f.alpha_at_bound) else math.inf)]
    if method == "snr":
        at = [irt.reference.optimal_sampling(a[i:i + 1], b[i:i + 1], method=float(r.alpha[i]))
              for i in range(a.shape[0])]
        kl_p, kl_t = torch.cat([x.kl_q_policy for x in at]), torch.cat([x.kl_q_target for x in at])
    else:
        kl_p, kl_t = f.kl_q_policy, f.kl_q_target
    out += [close("kl_q_policy", r.kl_q_policy, kl_p, KL_TOL, KL_TOL),
            close("kl_q_target", r.kl_q_target, kl_t, KL_TOL, KL_TOL)]
    if method == "kl_symmetry":
        out.append(close("log_q_full", r.log_q_full, f.log_q_full, 1e-6, LOG_Q_TOL))
    idx = r.tokens.cpu().unsqueeze(1)
    for name, logits in (("log_p_policy", a), ("log_p_target", b)):
        want = torch.log_softmax(logits.double(), -1).gather(1, idx).squeeze(1)
        out.append(close(name, getattr(r, name), want, 1e-6, TOKEN_LOG_PROB_TOL))
    out.append(close("log_q (at the token)", r.log_q, r.log_q_full.gather(1, r.tokens.unsqueeze(1)).squeeze(1),
                     0.0, 1e-5))
    return out


def capture_policy_step(static: list, family: str, agg: str, **options):
    """README "CUDA graphs": two warm-up steps on a side stream, then forward + backward of
    ``irt.policy_loss(*static, family, agg, **options)`` captured on the static inputs
    (static[0] requires grad; a host sync during capture raises). Returns (graph, loss, metrics)."""
    import torch

    import isreshape_triton as irt

    lp = static[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            lp.grad = None
            irt.policy_loss(lp, *static[1:], family, agg, **options)[0].backward()
    torch.cuda.current_stream().wait_stream(side)
    lp.grad = None
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            loss, metrics = irt.policy_loss(lp, *static[1:], family, agg, **options)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return graph, loss, metrics


def check_cuda_graph(s: Settings, family: str, agg: str) -> List[Diff]:
    """README "CUDA graphs": capture (``capture_policy_step``), copy two new batches into the
    static inputs, replay each and compare with an eager call bit for bit."""
    import torch

    if not s.cuda:
        raise Skip("no CUDA")
    static = list(_batch(s, "fp32", seed=0))
    lp = static[0].requires_grad_()
    graph, loss, metrics = capture_policy_step(static, family, agg)
    out = []
    for seed in (1, 2):
        new = _batch(s, "fp32", seed=seed)
        with torch.no_grad():
            for dst, src in zip(static, new):
                dst.copy_(src)
        graph.replay()
        r_loss, r_metrics, r_grad = _fused_step(*new, family, agg)
        out += [bitwise(f"replay {seed}: loss", loss.detach(), r_loss),
                bitwise(f"replay {seed}: grad", lp.grad, r_grad)]
        out += [bitwise(f"replay {seed}: metrics.{k}", metrics[k], r_metrics[k]) for k in sorted(metrics)]
    return out


def check_repeatable(s: Settings, family: str, agg: str) -> List[Diff]:
    """The same call twice: the same bits of loss, gradient and every metric."""
    inputs = _batch(s, "fp32", seed=4)
    first, second = _fused_step(*inputs, family, agg), _fused_step(*inputs, family, agg)
    return [bitwise("loss", first[0], second[0]), bitwise("grad", first[2], second[2])] + \
        [bitwise(f"metrics.{k}", first[1][k], second[1][k]) for k in sorted(first[1])]


def readme_compile_snippet() -> str:
    """The python block after the README's compile-snippet marker (tests/test_compile.py runs it too)."""
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text.split(README_SNIPPET_MARKER, 1)[1], re.S).group(1)
    if "torch.compile(fullgraph=True)" not in code:
        raise ValueError("the README's compile snippet no longer calls torch.compile(fullgraph=True)")
    return code


def check_compile_snippet(s: Settings) -> List[Diff]:
    """The README's compile snippet as written (``fullgraph=True``) with ``s.compile_backend``,
    on ``s.device``; then its last batch compiled against the same function run eagerly (loss,
    metrics, the model's gradient), and the snippet's ``torch.func.grad`` against autograd."""
    import torch
    from torch._dynamo.utils import counters

    code = readme_compile_snippet().replace(
        "torch.compile(fullgraph=True)", f"torch.compile(fullgraph=True, backend={s.compile_backend!r})")
    torch._dynamo.reset()
    counters.clear()
    scope: dict = {}
    try:
        with torch.device(s.device):  # the snippet builds its model and batches on the default device
            exec(compile(code, "README.md (compile snippet)", "exec"), scope)
            batch = [scope[k] for k in ("features", "labels", "old_log_prob", "advantages", "response_mask")]
            model = scope["model"]

            def run(fn):
                model.zero_grad()
                loss, metrics = fn(*batch)
                loss.backward()
                return loss.detach(), metrics, model.weight.grad.clone()

            loss, metrics, grad = run(scope["policy_step"])
            e_loss, e_metrics, e_grad = run(scope["policy_step"]._torchdynamo_orig_callable)
            lp = scope["log_prob"].detach().requires_grad_()  # the snippet's torch.func.grad, by autograd
            scope["irt"].policy_loss(lp, *batch[2:])[0].backward()
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    return [loss_diff(loss, e_loss), grad_diff("model.weight.grad", grad, e_grad, "fp32"),
            grad_diff("torch.func.grad", scope["grad"], lp.grad, "fp32"),
            Diff(f"unique graphs: {graphs}", 0.0, 0.0 if graphs == 1 else math.inf)] + metric_diffs(metrics, e_metrics)


def correctness_plan(s: Settings) -> list:
    """(group, name, thunk) of every check, in order (the dry run checks every family and
    aggregation in fp32 only: the interpreter's bf16 is the test suite's)."""
    import isreshape_triton as irt

    plan = []
    for dtype_name in ("fp32",) if s.dry_run else ("fp32", "bf16"):
        for family in irt.LOSS_TYPES:
            for agg in irt.AGG_MODES:
                plan.append(("policy_loss", f"{family} {agg} {dtype_name} {s.check_shape[0]}×{s.check_shape[1]}",
                             lambda f=family, a=agg, d=dtype_name: check_policy_loss(s, f, a, d)))
    for i, family in enumerate(irt.LOSS_TYPES):
        agg = irt.AGG_MODES[(i + 3) % len(irt.AGG_MODES)]  # seq-mean-token-mean first: rows matter
        plan.append(("packed", f"{family} {agg} fp32, {len(s.packed_lengths)} seqs, {sum(s.packed_lengths)} tokens",
                     lambda f=family, a=agg: check_packed(s, f, a)))
    for family, dtype_name, N, V in s.logits_checks:
        plan.append(("from_logits", f"policy_loss_from_logits {family} {dtype_name} N={N} V={V} + entropy bonus",
                     lambda f=family, d=dtype_name, n=N, v=V: check_from_logits(s, f, d, n, v)))
        plan.append(("from_logits", f"selective_log_softmax {dtype_name} N={N} V={V}",
                     lambda d=dtype_name, n=N, v=V: check_selective_log_softmax(s, d, n, v)))
    for method in ("kl_symmetry", "snr"):
        plan.append(("sampling", f"optimal_sampling {method} {s.sampling_shape[0]} rows V={s.sampling_shape[1]}",
                     lambda m=method: check_sampling(s, m)))
    for i, family in enumerate(irt.LOSS_TYPES):
        agg = irt.AGG_MODES[i % len(irt.AGG_MODES)]
        plan.append(("cuda_graph", f"{family} {agg}", lambda f=family, a=agg: check_cuda_graph(s, f, a)))
    for family in irt.LOSS_TYPES:
        plan.append(("repeatable", f"{family} seq-mean-token-mean",
                     lambda f=family: check_repeatable(s, f, "seq-mean-token-mean")))
    plan.append(("compile", f"README snippet, torch.compile(fullgraph=True, backend={s.compile_backend!r})",
                 lambda: check_compile_snippet(s)))
    return plan


# ----------------------------------------------------------------------------- timings

@dataclass
class Timing:
    impl: str  # fused | eager | compiled | liger
    family: str
    dtype: str
    case: str
    tokens: int
    us: Optional[float] = None
    model_us: Optional[float] = None  # the SASS model (bench/results/model.json), fused only
    model_error: Optional[float] = None  # measured / model − 1
    roofline_us: Optional[float] = None
    note: str = ""


def load_model(path: Path = MODEL_JSON) -> dict:
    """{(family, dtype, case label): model row} of bench/results/model.json ({} if absent)."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("results", {})
    return {(r["family"], r["dtype"], r["case"]): r for results in rows.values() for r in results}


def time_us(step: Callable[[], None], s: Settings) -> float:
    """Median µs of ``step`` (``do_bench``) on CUDA; one timed call on the CPU. ``step`` has run
    once before (compiles)."""
    import torch

    if s.cuda:
        from triton.testing import do_bench

        torch.cuda.synchronize()
        return do_bench(step, warmup=s.warmup_ms, rep=s.rep_ms, return_mode="median") * 1e3
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e6


def _backward(loss):
    import torch

    loss.backward(torch.ones((), dtype=loss.dtype, device=loss.device))


def fused_step(family: str, case, dtype_name: str, s: Settings) -> Callable[[], None]:
    import isreshape_triton as irt

    from . import h100

    lp, old, adv, mask, extra = h100.case_inputs(case, _dtype(dtype_name), s.device)

    def step():
        lp.grad = None
        _backward(irt.policy_loss(lp, old, adv, mask, family, **extra)[0])
    return step


def _padded_inputs(case, s: Settings):
    """The eager code takes [R, T]: the packed case as its padded stand-in (as bench/h100.py)."""
    from . import h100

    return h100.case_inputs(h100.Case(case.label, case.R, case.T), _dtype("fp32"), s.device)[:4]


def eager_step(family: str, case, s: Settings, compiled: Optional[dict] = None) -> Callable[[], None]:
    """bench/eager.py's trainer code, or with ``compiled`` its ``torch.compile`` (one per family,
    ``dynamic=True``: every shape runs the same compiled code)."""
    import torch

    from .eager import EAGER

    fn = EAGER[family]
    if compiled is not None:
        if family not in compiled:
            compiled[family] = torch.compile(fn, backend=s.compile_backend, dynamic=True)
        fn = compiled[family]
    lp, old, adv, mask = _padded_inputs(case, s)

    def step():
        lp.grad = None
        _backward(fn(lp, old, adv, mask, "token-mean")[0])
    return step


def liger_step(family: str, case, s: Settings) -> Callable[[], None]:
    """Liger-Kernel's ``triton_grpo_loss`` (``bnpo``: PPO clip, token-mean) on logits [R, T+1, 1]."""
    import torch

    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        raise Skip(f"liger_kernel not importable ({e})")
    if family != "ppo_clip":
        raise Skip("Liger's GRPO loss is PPO clip")
    if case.T > 65535:
        raise Skip("Liger launches a (B, T) grid: T > 65535 exceeds CUDA's grid y limit")
    lp, old, adv, mask = _padded_inputs(case, s)
    R, T = lp.shape
    logits = torch.zeros(R, T + 1, LIGER_V, device=s.device).requires_grad_()
    ids = torch.zeros(R, T, dtype=torch.long, device=s.device)
    adv, mask = adv[:, 0].contiguous(), mask.float()

    def step():
        logits.grad = None
        out = triton_grpo_loss(logits, old, None, ids, adv, mask, temperature=1.0, beta=0.0, eps_low=0.2,
                               eps_high=0.2, inplace=False, loss_type="bnpo", reduce=True)
        _backward(out[0] if isinstance(out, tuple) else out)
    return step


KEY_FAMILIES = ("is_reshape", "ppo_clip")  # compiled and bf16 timings first for these


def timing_jobs(s: Settings) -> list:
    """(impl, family, dtype) in priority order; no new one starts after the budget. The dry run
    times a subset that still runs every implementation."""
    import isreshape_triton as irt

    families = list(KEY_FAMILIES) if s.dry_run else list(irt.LOSS_TYPES)
    key = KEY_FAMILIES[1:] if s.dry_run else KEY_FAMILIES
    rest = [f for f in families if f not in key]
    return ([("fused", f, "fp32") for f in families] + [("eager", f, "fp32") for f in families]
            + [("liger", "ppo_clip", "fp32")] + [("compiled", f, "fp32") for f in key]
            + [("fused", f, "bf16") for f in key] + [("compiled", f, "fp32") for f in rest])


COMPILE_HEADROOM_S = 90.0  # a torch.compile job starts only this long before the budget ends


def measure(t: Timing, case, s: Settings, compiled: dict) -> None:
    """Fills ``t.us`` (or ``t.note`` with why not)."""
    try:
        step = {"fused": lambda: fused_step(t.family, case, t.dtype, s),
                "eager": lambda: eager_step(t.family, case, s),
                "compiled": lambda: eager_step(t.family, case, s, compiled),
                "liger": lambda: liger_step(t.family, case, s)}[t.impl]()
        step()  # compiles
        t.us = time_us(step, s)
    except Skip as e:
        t.note = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - recorded, the next timing runs
        t.note = f"error: {type(e).__name__}: {e}"[:300]


def run_timings(s: Settings, deadline: float, log=sys.stderr) -> List[Timing]:
    """Every (job, shape) of ``timing_jobs`` until the budget: fwd+bwd µs, and beside the fused
    ones the model of bench/results/model.json and its error."""
    import torch

    model = load_model()
    compiled: dict = {}
    out = []
    for impl, family, dtype_name in timing_jobs(s):
        for case in s.cases:
            t = Timing(impl, family, dtype_name, case.label, case.tokens)
            out.append(t)
            if time.perf_counter() > deadline - (COMPILE_HEADROOM_S if impl == "compiled" and s.cuda else 0.0):
                t.note = "skipped: time budget (--budget-s)"
            else:
                measure(t, case, s, compiled)
            row = model.get((family, dtype_name, case.label)) if impl == "fused" else None
            if row:
                t.model_us, t.roofline_us = row["model_us"], row.get("roofline_us")
                t.model_error = t.us / t.model_us - 1 if t.us and s.cuda else None
            elif impl == "fused" and s.cuda and not t.note:
                t.note = "no model row"
            log.write(f"gpu_check: time {impl} {family} {dtype_name} {case.label}: "
                      f"{'%.1f µs' % t.us if t.us else t.note}\n")
    torch._dynamo.reset()  # the compiled eager code is not needed any more
    return out


# ----------------------------------------------------------------------------- warm-up

WARM_GROUPS = ("policy_loss", "packed", "from_logits", "sampling")


def warm_items(s: Settings) -> list:
    """What compiles Triton kernels: the checks of ``WARM_GROUPS`` and one fused step per timed
    (family, dtype, shape)."""
    items = [thunk for group, _, thunk in correctness_plan(s) if group in WARM_GROUPS]
    return items + [lambda f=family, c=case, d=dtype_name: fused_step(f, c, d, s)()
                    for impl, family, dtype_name in timing_jobs(s) if impl == "fused" for case in s.cases]


def warm_shard(s: Settings, shard: int, shards: int) -> int:
    """Runs items ``shard``, ``shard + shards``, ... of ``warm_items``; errors are left to the
    main run to report. Returns how many ran."""
    items = warm_items(s)[shard::shards]
    for item in items:
        try:
            item()
        except Exception:  # noqa: BLE001 - the main run checks (and reports) every item
            pass
    return len(items)


def prewarm(s: Settings, jobs: int, timeout_s: float = 240.0) -> str:
    """Compiles the kernels in ``jobs`` processes first (``--warm-shard i/jobs``): Triton's disk
    cache, shared by every process of the user, then hands the compiled kernels to this one,
    so the one-at-a-time JIT of the checks does not eat the time budget. Returns a note."""
    import subprocess
    import tempfile

    from . import REPO

    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "bench.gpu_check", "--device", s.device] + (["--dry-run"] if s.dry_run else [])
    logs = [tempfile.TemporaryFile() for _ in range(jobs)]
    procs = [subprocess.Popen(cmd + ["--warm-shard", f"{i}/{jobs}"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=logs[i]) for i in range(jobs)]
    problems = []
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=max(1.0, t0 + timeout_s - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        if rc != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
            problems.append(f"exit {rc}: {tail[0][:200]}")
        log.close()
    return (f"warm-up: {jobs} processes compiled the kernels in {time.perf_counter() - t0:.0f} s"
            + (f"; {len(problems)} did not finish cleanly ({'; '.join(problems[:2])})" if problems else ""))


# ----------------------------------------------------------------------------- report

def environment(s: Settings) -> dict:
    import torch
    import triton

    env = {"device": s.device, "dry_run": s.dry_run, "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "gpu": None,
           "timing": "triton.testing.do_bench median" if s.cuda else "one timed call (not a speed figure)"}
    if s.cuda:
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        import importlib.metadata as md
        env["liger_kernel"] = md.version("liger-kernel")
    except Exception:  # noqa: BLE001
        env["liger_kernel"] = None
    return env


def summarize(checks: List[Check]) -> dict:
    counts = {k: sum(c.status == k for c in checks) for k in ("pass", "fail", "skipped", "error")}
    return {"checks": len(checks), **counts, "ok": counts["fail"] == 0 and counts["error"] == 0}


def _num(x, fmt="{:.3g}"):
    return "" if x is None else fmt.format(x)


def checks_table(checks: List[Check]) -> str:
    lines = ["| group | check | status | max abs err | worst (err / tol) | s | detail |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        worst = f"{c.worst} ({c.tol_ratio:.2g})" if c.worst is not None else ""
        lines.append(f"| {c.group} | {c.name} | {c.status} | {_num(c.max_abs_err)} | {worst} | {c.seconds:.1f} | "
                     f"{c.detail.replace('|', '/')} |")
    return "\n".join(lines)


def timings_table(timings: List[Timing], ratios: bool = True) -> str:
    """One row per (family, dtype, shape): the fused time, the model and its error, the roofline,
    and the other implementations (with ``ratios``, their time over the fused time)."""
    by = {}
    for t in timings:
        by.setdefault((t.family, t.dtype, t.case), {})[t.impl] = t
    lines = ["| family | dtype | shape | fused µs | model µs | measured / model − 1 | roofline µs | eager µs (×) "
             "| compiled µs (×) | Liger µs (×) | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (family, dtype, case), row in by.items():
        fused = row.get("fused")
        base = fused.us if fused else None

        def cell(impl):
            t = row.get(impl)
            if t is None or t.us is None:
                return ""
            return f"{t.us:,.1f}" + (f" ({t.us / base:.1f}×)" if base and ratios else "")

        notes = "; ".join(f"{t.impl}: {t.note}" for t in row.values() if t.note)
        lines.append(f"| {family} | {dtype} | {case} | {_num(base, '{:,.1f}')} | "
                     f"{_num(fused.model_us if fused else None, '{:,.1f}')} | "
                     f"{_num(fused.model_error if fused else None, '{:+.0%}')} | "
                     f"{_num(fused.roofline_us if fused else None, '{:,.1f}')} | {cell('eager')} | "
                     f"{cell('compiled')} | {cell('liger')} | {notes} |")
    return "\n".join(lines)


def render(env: dict, summary: dict, checks: List[Check], timings: List[Timing], notes: List[str],
           wall_s: float) -> str:
    title = "dry run: CPU, Triton interpreter, tiny shapes" if env["dry_run"] and not env["gpu"] else env["gpu"]
    parts = [f"# gpu_check ({title})\n",
             f"torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}, "
             f"Liger-Kernel {env['liger_kernel']}; timings: {env['timing']}; wall {wall_s:.0f} s.\n",
             f"**Checks: {summary['pass']} passed, {summary['fail']} failed, {summary['error']} errors, "
             f"{summary['skipped']} skipped of {summary['checks']}** — "
             f"{'OK' if summary['ok'] else 'FAILED'}.\n", "## Correctness\n",
             "Against `irt.reference` in float64 from the same inputs; `worst` is the quantity with the "
             "largest error over its tolerance (≤ 1 passes).\n", checks_table(checks),
             "\n## Timings (forward + backward)\n",
             "Fused: `irt.policy_loss` (token-mean); eager: bench/eager.py; compiled: `torch.compile` of "
             "the eager code (`dynamic=True`); Liger: `triton_grpo_loss` (bnpo) on logits [R, T+1, "
             f"{LIGER_V}]. The packed batch runs packed (`cu_seqlens`) in the fused op and as its padded "
             "stand-in elsewhere. Model: the SASS model of bench/results/model.json (a model; "
             "roofline = bytes / 3.35 TB/s + 4 µs × launches).\n", timings_table(timings, ratios=bool(env["gpu"]))]
    if notes:
        parts += ["\n## Notes\n"] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def plot(timings: List[Timing], path: Path, title: str) -> None:
    """One panel per shape: µs per family for every implementation (log scale), the model as a marker."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(t.case for t in timings))
    families = list(dict.fromkeys(t.family for t in timings))
    impls = ["fused", "eager", "compiled", "liger"]
    cols = min(3, len(cases))
    fig, axes = plt.subplots(math.ceil(len(cases) / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(len(cases) / cols)),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, case in zip(axes.flat, cases):
        for j, impl in enumerate(impls):
            ys = [next((t.us for t in timings if (t.impl, t.family, t.dtype, t.case) == (impl, f, "fp32", case)), None)
                  for f in families]
            xs = [i + (j - 1.5) * width for i, y in enumerate(ys) if y]
            if xs:
                ax.bar(xs, [y for y in ys if y], width, label=impl)
        model = [(i, t.model_us) for i, f in enumerate(families) for t in timings
                 if (t.impl, t.family, t.dtype, t.case) == ("fused", f, "fp32", case) and t.model_us]
        if model:
            ax.plot([i - 1.5 * width for i, _ in model], [m for _, m in model], "k_", markersize=12, label="model")
        ax.set_yscale("log")
        ax.set_title(case, fontsize=9)
        ax.set_xticks(range(len(families)))
        ax.set_xticklabels(families, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("µs (fwd+bwd)")
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(x):
    """JSON has no inf / NaN: such floats are written as the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_outputs(out: Path, env, summary, checks, timings, notes, wall_s) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot(timings, out / "gpu_check.png", f"fwd+bwd on {env['gpu']}" if env["gpu"] else
             "CPU dry run (Triton interpreter): wall time of one call, not a speed figure")
    except ImportError as e:
        notes.append(f"no gpu_check.png: matplotlib is missing ({e})")
    except Exception as e:  # noqa: BLE001 - the figures matter more than the picture
        notes.append(f"no gpu_check.png: {type(e).__name__}: {e}")
    payload = {"schema": 1, "environment": env, "summary": summary, "wall_s": wall_s, "notes": notes,
               "tolerances": {"value_rtol": VALUE_RTOL, "grad_rtol": GRAD_RTOL, "alpha": ALPHA_TOL, "kl": KL_TOL,
                              "log_q": LOG_Q_TOL, "token_log_prob": TOKEN_LOG_PROB_TOL},
               "checks": [asdict(c) for c in checks], "timings": [asdict(t) for t in timings]}
    (out / "gpu_check.json").write_text(json.dumps(_finite(payload), indent=1, default=str))
    (out / "gpu_check.md").write_text(render(env, summary, checks, timings, notes, wall_s))


# ----------------------------------------------------------------------------- main

def select_device(requested: str, dry_run: bool) -> tuple:
    """(device, None), or (None, the one-line reason this run cannot go on)."""
    import torch

    device = requested if requested != "auto" else ("cpu" if dry_run else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        return None, (f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU; "
                      "use --dry-run for the CPU run under the Triton interpreter")
    if device == "cpu" and not dry_run:
        return None, "no CUDA device requested (--device cpu): the full check needs a GPU; use --dry-run on the CPU"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, ("TRITON_INTERPRET is not 1 (triton imported first?): the CPU run would test the reference, "
                      "not the kernels")
    return device, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes; on the CPU under the Triton interpreter unless --device cuda")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cpu with --dry-run, else cuda")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="soft wall-clock budget: no new timing starts after it (default 390 s, dry run 150 s)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes that compile the kernels first (default: 8 on CUDA, none in a dry run)")
    parser.add_argument("--warm-shard", default=None, help=argparse.SUPPRESS)  # i/n: a warm-up worker (prewarm)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    if args.dry_run and args.device != "cuda":
        use_interpreter()  # before anything imports triton
    device, error = select_device(args.device, args.dry_run)
    if error:
        sys.stderr.write(f"gpu_check: {error}\n")
        return 2
    s = make_settings(args.dry_run, device, args.budget_s)
    if args.warm_shard:
        shard, shards = map(int, args.warm_shard.split("/"))
        warm_shard(s, shard, shards)
        return 0
    sys.stderr.write(f"gpu_check: {'dry run' if s.dry_run else 'full run'} on {device}\n")
    notes = []
    jobs = args.jobs if args.jobs is not None else (min(8, os.cpu_count() or 1) if s.cuda and not s.dry_run else 0)
    if jobs > 0:
        notes.append(prewarm(s, jobs))
        sys.stderr.write(f"gpu_check: {notes[-1]}\n")
    if not s.cuda:
        notes.append("CPU dry run: the Triton kernels run in the interpreter; times are one call each, "
                     "not speed figures; CUDA-graph checks are skipped (no CUDA).")
    checks = [run_check(group, name, thunk) for group, name, thunk in correctness_plan(s)]
    timings = run_timings(s, t0 + s.budget_s)
    if any(t.note.startswith("skipped: time budget") for t in timings):
        notes.append(f"the time budget ({s.budget_s:.0f} s) ran out: later timings skipped")
    if not load_model():
        notes.append(f"no {MODEL_JSON}: no model column")
    summary = summarize(checks)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    write_outputs(out, environment(s), summary, checks, timings, notes, wall)
    sys.stderr.write(f"gpu_check: {summary['pass']} passed, {summary['fail']} failed, {summary['error']} errors, "
                     f"{summary['skipped']} skipped; {wall:.0f} s; wrote {out}/gpu_check.{{json,md,png}}\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
