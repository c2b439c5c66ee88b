"""The fused op: ``fused_policy_loss`` = validation + ``plan_launches`` + a thin
autograd Function.

Forward: ``batch_stats_kernel`` (only families whose γ or weight needs batch or
row statistics), ``token_loss_kernel`` (φ, F, −m·φ, partial sums) and
``finalize_kernel`` (loss, metrics, per-row scale s_b). Backward: two torch
multiplies, grad = (−m·φ)·(s_b·grad_out), written in log_prob's dtype. No host
sync: every count, γ and denominator stays on the device, also for
``gamma="psis"``, whose smoothing runs as torch ops before pass 2 (the one place
with more than two torch ops).

Float parameters reach the kernels as fp32 scalars (Triton's scalar ABI), also
for fp64 inputs, whose arithmetic is otherwise fp64.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton.language as tl

from .families import ESS_GRID_POINTS, KernelFamily, kernel_family
from .inputs import Inputs, prepare_inputs
from .kernels import finalize as kfin
from .kernels import families as kf
from .kernels import layout
from .kernels.finalize import finalize_kernel
from .kernels.loss import token_loss_kernel
from .kernels.stats import batch_stats_kernel
from .metrics import metric_names
from .params import AGG_MODES, AggConfig, make_params
from .psis import K_HAT_THRESHOLD, psis_gamma

MAX_PROGRAMS = 256  # persistent grid size cap = number of partial records
BLOCK_REC = 64
_AGG_CODE = {name: i for i, name in enumerate(AGG_MODES)}
assert _AGG_CODE["seq-mean-token-mean"] == kfin.SEQ_MEAN_TOKEN_MEAN.value
_METRIC_INDEX = {name: i for i, name in enumerate(layout.METRIC_SLOTS)}


# Tile sizes (tokens) and warps per kernel, by compute dtype, fixed so that no size
# change ever compiles a new kernel. No software pipelining: it buys nothing for these
# masked row walks and costs minutes of compile time (measured: 40-560 s per
# specialization with num_stages=3, 0.5-2 s with 1). Each choice is the spill-free point
# of an sm_90 sweep over tile sizes and 2/4/8 warps (with 8 warps ptxas aims at 64
# registers and spills a few bytes unless maxnreg lets it take 128; likewise fp64 at 168);
# ``python -m isreshape_triton.aot`` and tests/test_zz_aot.py check every specialization.
STATS_TILE = {False: (1024, dict(num_warps=4)), True: (256, dict(num_warps=8))}  # by fp64
STATS_TILE_ESS_EXACT = {False: (32, dict(num_warps=4)), True: (32, dict(num_warps=8))}
LOSS_TILE = {False: (256, dict(num_warps=8, maxnreg=128)), True: (64, dict(num_warps=4, maxnreg=255))}


def _tile(table: dict, fp64: bool):
    """(BLOCK_T, launch options) of a kernel for fp32 or fp64 compute."""
    block, options = table[fp64]
    return block, {**options, "num_stages": 1}


@dataclass
class Launch:
    """One kernel launch: grid, arguments, constexprs and options (also used by ``aot``)."""

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    options: dict

    def __call__(self):
        self.kernel[self.grid](**self.args, **self.constexprs, **self.options)


@dataclass
class Plan:
    steps: list  # Launch objects, and the all-gather of the records with a process group
    loss: torch.Tensor
    metrics: torch.Tensor
    grad: Optional[torch.Tensor]
    row_scale: torch.Tensor


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write (tests replace this with a NaN-poisoned fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(t: Optional[torch.Tensor]) -> tuple:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def plan_launches(x: Inputs, fam: KernelFamily, agg: AggConfig, clamp: float, write_grad: bool,
                  gamma: Optional[torch.Tensor] = None, process_group=None) -> Plan:
    """Allocate the outputs and list the steps of the forward pass: 2-3 kernel launches,
    plus one all-gather of the statistics records with ``process_group``.

    ``gamma``: the (c0, c1) context computed on the device beforehand (PSIS), shape
    [2] for the batch or [R, 2] per row.
    """
    lp, olp, adv, mask = x.log_prob, x.old_log_prob, x.advantages, x.response_mask
    R, T = lp.shape
    dev = lp.device
    acc = _acc_dtype(lp.dtype)
    programs = max(1, min(R, MAX_PROGRAMS))
    ess_exact = fam.ess_exact
    G = ESS_GRID_POINTS if ess_exact else 2
    KS = layout.S_BASE_WIDTH + (8 * G if ess_exact else 0)
    batch_stats = fam.needs_stats and not fam.per_row
    row_stats = fam.needs_stats and fam.per_row
    empty = torch.empty(0, device=dev, dtype=acc)
    row_rec = _empty((R, KS), acc, dev) if row_stats else empty
    prog_rec = empty
    if batch_stats:  # distributed: a fixed number of records per rank, unused ones neutral (n = 0)
        prog_rec = (_empty((programs, KS), acc, dev) if process_group is None
                    else torch.zeros((MAX_PROGRAMS, KS), device=dev, dtype=acc))
    grad = _empty((R, T), acc, dev) if write_grad else None
    row_count = _empty((R,), acc, dev)
    partial = _empty((programs, layout.PARTIAL_WIDTH.value), acc, dev)
    ctx = _empty((2,), acc, dev)
    loss = _empty((), acc, dev)
    metrics = _empty((layout.METRIC_WIDTH.value,), acc, dev)
    row_scale = _empty((R,), acc, dev)

    (s_lp_r, s_lp_t), (s_olp_r, s_olp_t) = _strides(lp), _strides(olp)
    (s_adv_r, s_adv_t), (s_mask_r, s_mask_t) = _strides(adv), _strides(mask)
    tokens = dict(lp_ptr=lp, olp_ptr=olp, adv_ptr=adv if adv is not None else lp,
                  mask_ptr=mask if mask is not None else lp, R=R, T=T,
                  s_lp_r=s_lp_r, s_lp_t=s_lp_t, s_olp_r=s_olp_r, s_olp_t=s_olp_t,
                  s_adv_r=s_adv_r, s_adv_t=s_adv_t, s_mask_r=s_mask_r, s_mask_t=s_mask_t,
                  clamp=float(clamp))
    ranges = dict(ga_lo=float(fam.range_a[0]), ga_hi=float(fam.range_a[1]),
                  gb_lo=float(fam.range_b[0]), gb_hi=float(fam.range_b[1]))
    flags = dict(ACC=_tl_dtype(lp.dtype), HAS_ADV=adv is not None, HAS_MASK=mask is not None,
                 KS=KS, G=G)
    fp64 = acc == torch.float64
    steps = []
    if fam.needs_stats:
        block, options = _tile(STATS_TILE_ESS_EXACT if ess_exact else STATS_TILE, fp64)
        steps.append(Launch(batch_stats_kernel, (programs,),
                            dict(**tokens, row_rec_ptr=row_rec, prog_rec_ptr=prog_rec, **ranges),
                            dict(**flags, SIGN_GROUPS=fam.sign_groups, ESS_EXACT=ess_exact,
                                 WRITE_ROWS=row_stats, WRITE_PROGRAMS=batch_stats, BLOCK_T=block),
                            options))
    records = prog_rec
    if batch_stats and process_group is not None:
        world = torch.distributed.get_world_size(process_group)
        records = torch.empty((world * MAX_PROGRAMS, KS), device=dev, dtype=acc)
        steps.append(functools.partial(torch.distributed.all_gather_into_tensor, records, prog_rec,
                                       group=process_group))
    p = dict(zip(("p0", "p1", "p2", "p3", "p4", "p5", "p6"), fam.floats))
    block, options = _tile(LOSS_TILE, fp64)
    steps.append(Launch(token_loss_kernel, (programs,),
                        dict(**tokens, rec_ptr=records, n_rec=records.shape[0] if batch_stats else 0,
                             row_rec_ptr=row_rec, gamma_ptr=ctx if gamma is None else gamma,
                             gamma_row_stride=2 if gamma is not None and gamma.dim() == 2 else 0,
                             grad_ptr=grad if write_grad else row_count,
                             row_count_ptr=row_count, partial_ptr=partial, ctx_ptr=ctx, **p, **ranges),
                        dict(**flags, FAMILY=fam.family, OPT=fam.opt, GAMMA_MODE=fam.gamma_mode,
                             BATCH_STATS=batch_stats, ROW_STATS=row_stats, WRITE_GRAD=write_grad,
                             BLOCK_REC=BLOCK_REC, BLOCK_T=block),
                        options))

    def given(v):
        return -1.0 if v is None else float(v)

    steps.append(Launch(finalize_kernel, (1,),
                        dict(partial_ptr=partial, n_part=programs, ctx_ptr=ctx, row_count_ptr=row_count,
                             row_scale_ptr=row_scale, loss_ptr=loss, metrics_ptr=metrics, R=R, T=T,
                             dp_size=float(agg.dp_size),
                             global_token_count=given(agg.global_token_count),
                             global_batch_size=given(agg.global_batch_size),
                             loss_scale_factor=given(agg.loss_scale_factor)),
                        dict(SEQ_GAMMA=fam.per_row and fam.family != kf.VESPO.value,
                             AGG=_AGG_CODE[agg.loss_agg_mode], BLOCK_P=MAX_PROGRAMS, BLOCK_R=1024),
                        {"num_warps": 4, "num_stages": 1}))
    return Plan(steps, loss, metrics, grad, row_scale)


def _gather_rows(tensors, process_group) -> list:
    """Each [R, T] tensor's rows from every rank, padded to the largest R and T (False or
    0), concatenated in rank order (identical on every rank). One host sync: the shapes."""
    world = torch.distributed.get_world_size(process_group)
    shape = torch.tensor(tensors[0].shape, device=tensors[0].device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape, group=process_group)
    R, T = (int(v) for v in torch.stack(shapes).amax(0).tolist())
    gathered = []
    for t in tensors:
        padded = t.new_zeros((R, T))
        padded[: t.shape[0], : t.shape[1]] = t
        out = t.new_empty((world * R, T))
        torch.distributed.all_gather_into_tensor(out, padded, group=process_group)
        gathered.append(out)
    return gathered


def _psis_context(x: Inputs, loss_type: str, params, fam: KernelFamily, clamp: float,
                  process_group=None):
    """(c0, c1) per batch ([2]) or per row ([R, 2]) from Pareto-smoothed IS, and the
    psis_k / psis_unreliable metrics: torch ops on the device (sorting and the
    generalized-Pareto fit are not kernel work), no host sync on one process. A group
    whose γ is fixed is not fitted (k̂ = 0). With ``process_group`` and one γ per batch,
    the fit runs on the gathered ℓ of all ranks (PSIS needs the tail of the global
    sample), so every rank computes the same γ; this costs one sync (the ranks' shapes).
    """
    acc = _acc_dtype(x.log_prob.dtype)
    counted = (torch.ones_like(x.log_prob, dtype=torch.bool) if x.response_mask is None
               else x.response_mask != 0)
    diff = x.log_prob.detach().to(acc) - x.old_log_prob.to(acc)
    ell = torch.where(counted, diff, 0.0).clamp(-clamp, clamp)
    per_row = fam.per_row
    dims = (1,) if per_row else (0, 1)
    if loss_type == "is_reshape_sign":
        adv = x.advantages.to(acc) if x.advantages is not None else torch.ones_like(ell)
        groups = [counted & (adv > 0), counted & (adv < 0)]
    else:
        groups = [counted]
    if process_group is not None and not per_row:
        ell, *groups = _gather_rows([ell, *groups], process_group)
    if loss_type == "is_reshape_sign":
        (g_pos, k_pos), (d_neg, k_neg) = (
            psis_gamma(ell, grp, rho_min=params.rho_min, lo=lo, hi=hi,
                       fallback=params.gamma_fallback, per_row=per_row)
            for grp, (lo, hi) in zip(groups, (fam.range_a, fam.range_b)))
        c0 = torch.where(groups[0].sum(dims) > 0, g_pos.to(acc), 0.5)
        c1 = torch.where(groups[1].sum(dims) > 0, 1.0 + d_neg.to(acc), 1.5)
        if params.gamma_pos is not None:
            c0 = torch.full_like(c0, params.gamma_pos)
        if params.gamma_neg is not None:
            c1 = torch.full_like(c1, params.gamma_neg)
        k_hat = torch.maximum(torch.zeros_like(k_pos) if params.gamma_pos is not None else k_pos,
                              torch.zeros_like(k_neg) if params.gamma_neg is not None else k_neg)
    else:
        g, k_hat = psis_gamma(ell, groups[0], rho_min=params.rho_min, lo=params.gamma_min,
                              hi=params.gamma_max, fallback=params.gamma_fallback, per_row=per_row)
        c0 = g.to(acc)
        c1 = torch.zeros_like(c0)
    k_hat = k_hat.to(acc)
    extra = {"psis_k": k_hat.amax() if k_hat.numel() else k_hat.new_zeros(()),
             "psis_unreliable": (k_hat > K_HAT_THRESHOLD).any().to(acc)}
    return torch.stack([c0, c1], dim=-1).contiguous(), extra


class _FusedPolicyLoss(torch.autograd.Function):
    """Forward runs the planned steps; backward scales the saved −m·φ."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, response_mask, config, gamma):
        x = Inputs(log_prob, old_log_prob, advantages, response_mask, log_prob.shape)
        plan = plan_launches(x, config.family, config.agg, config.clamp, config.write_grad,
                             gamma, config.process_group)
        for step in plan.steps:
            step()
        ctx.grad_dtype = log_prob.dtype
        ctx.save_for_backward(plan.grad, plan.row_scale)
        ctx.mark_non_differentiable(plan.metrics)
        ctx.set_materialize_grads(False)
        return plan.loss, plan.metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        if grad_loss is None:
            return None, None, None, None, None, None
        neg_phi, row_scale = ctx.saved_tensors
        grad = _empty(neg_phi.shape, ctx.grad_dtype, neg_phi.device)
        torch.mul(neg_phi, (row_scale * grad_loss).unsqueeze(1), out=grad)
        return grad, None, None, None, None, None


@dataclass(frozen=True)
class _Config:
    family: KernelFamily
    agg: AggConfig
    clamp: float
    write_grad: bool
    process_group: object = None


def fused_policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                      loss_type="is_reshape", loss_agg_mode="token-mean", *, dp_size=1,
                      global_token_count=None, global_batch_size=None, loss_scale_factor=None,
                      log_ratio_clamp=20.0, process_group=None, params=None, **family_params):
    """``irt.policy_loss`` on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    With ``process_group`` every rank merges the statistics records of all ranks, so γ
    is that of the concatenated global batch and bit-identical on every rank.
    """
    params = make_params(loss_type, params, **family_params)
    agg = AggConfig(loss_agg_mode, dp_size, global_token_count, global_batch_size, loss_scale_factor)
    x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, log_ratio_clamp)
    fam = kernel_family(loss_type, params)
    gamma, extra = (None, {})
    if fam.psis:
        gamma, extra = _psis_context(x, loss_type, params, fam, float(log_ratio_clamp), process_group)
    write_grad = torch.is_grad_enabled() and log_prob.requires_grad
    config = _Config(fam, agg, float(log_ratio_clamp), write_grad, process_group)
    loss, metric_vec = _FusedPolicyLoss.apply(x.log_prob, x.old_log_prob, x.advantages,
                                              x.response_mask, config, gamma)
    metrics = {name: extra[name] if name in extra else metric_vec[_METRIC_INDEX[name]]
               for name in metric_names(loss_type, params)}
    return loss, metrics


def traffic_model(loss_type: str, dtype: torch.dtype, mask_dtype: Optional[torch.dtype], B: int, T: int,
                  adv_shape: str = "BT", params=None, backward: bool = True) -> int:
    """Tensor bytes the fused op moves for a [B, T] batch (forward + backward), counting
    every tensor once per kernel that reads or writes it.

    Per token: pass 2 reads every input once and pass 1 (families with statistics) reads
    them again, advantages only where it needs them (the sign family's groups); pass 2
    writes −m·φ in fp32 (fp64 for fp64); the backward reads it and writes the gradient in
    log_prob's dtype. Plus the O(B + programs) record, partial and scale buffers
    (``traffic_model(..., T=0)`` is that fixed part). adv_shape: "BT", "B" or "none".
    """
    params = make_params(loss_type, params)
    fam = kernel_family(loss_type, params)
    item = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=_acc_dtype(dtype)).element_size()
    n = B * T
    adv_bytes = {"BT": item * n, "B": item * B, "none": 0}[adv_shape]
    mask_bytes = 0 if mask_dtype is None else torch.empty((), dtype=mask_dtype).element_size() * n
    total = 2 * item * n + adv_bytes + mask_bytes  # pass 2
    programs = max(1, min(B, MAX_PROGRAMS))
    if fam.needs_stats:
        ks = layout.S_BASE_WIDTH + (8 * ESS_GRID_POINTS if fam.ess_exact else 0)
        records = (B if fam.per_row else programs) * ks * acc
        total += 2 * item * n + (adv_bytes if fam.sign_groups else 0) + mask_bytes + 2 * records
    if backward:
        total += acc * n + acc * n + item * n
    # partials (written, read), row counts (written, read), row scale (written, read twice)
    total += acc * (2 * programs * layout.PARTIAL_WIDTH.value + 2 * B + 3 * B + 2 + layout.METRIC_WIDTH.value)
    return total
