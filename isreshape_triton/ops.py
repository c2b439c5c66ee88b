"""The fused op: ``fused_policy_loss`` = validation + ``plan_launches`` + a thin
autograd Function.

Forward: ``batch_stats_kernel`` (only families whose γ or weight needs batch or
row statistics), ``token_loss_kernel`` (φ, F, −m·φ, partial sums) and
``finalize_kernel`` (loss, metrics, per-row scale s_b). Backward: one torch
multiply, grad = (−m·φ)·(s_b·grad_out), written in log_prob's dtype. No host
sync: every count, γ and denominator stays on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
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

MAX_PROGRAMS = 256  # persistent grid size cap = number of partial records
BLOCK_REC = 64
_AGG_CODE = {name: i for i, name in enumerate(AGG_MODES)}
assert _AGG_CODE["seq-mean-token-mean"] == kfin.SEQ_MEAN_TOKEN_MEAN
_METRIC_INDEX = {name: i for i, name in enumerate(layout.METRIC_SLOTS)}


@dataclass
class Launch:
    """One kernel launch: grid, tensor/scalar arguments and constexprs (also used by ``aot``)."""

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict

    def __call__(self):
        self.kernel[self.grid](**self.args, **self.constexprs)


@dataclass
class Plan:
    launches: list
    loss: torch.Tensor
    metrics: torch.Tensor
    grad: Optional[torch.Tensor]
    row_scale: torch.Tensor
    stats_records: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write (tests replace this with a NaN-poisoned fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strides(t: Optional[torch.Tensor]) -> tuple:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _block_t(T: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(T, 1))))


def plan_launches(x: Inputs, fam: KernelFamily, agg: AggConfig, clamp: float,
                  write_grad: bool) -> Plan:
    """Allocate the outputs and describe the 2-3 launches of the forward pass."""
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
    prog_rec = _empty((programs, KS), acc, dev) if batch_stats else empty
    grad = _empty((R, T), acc, dev) if write_grad else None
    row_count = _empty((R,), acc, dev)
    partial = _empty((programs, layout.PARTIAL_WIDTH), acc, dev)
    ctx = _empty((2,), acc, dev)
    loss = _empty((), acc, dev)
    metrics = _empty((layout.METRIC_WIDTH,), acc, dev)
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
    launches = []
    if fam.needs_stats:
        launches.append(Launch(batch_stats_kernel, (programs,),
                               dict(**tokens, row_rec_ptr=row_rec, prog_rec_ptr=prog_rec, **ranges),
                               dict(**flags, SIGN_GROUPS=fam.sign_groups, ESS_EXACT=ess_exact,
                                    WRITE_ROWS=row_stats, WRITE_PROGRAMS=batch_stats,
                                    BLOCK_T=_block_t(T, 128 if ess_exact else 1024))))
    p = dict(zip(("p0", "p1", "p2", "p3", "p4", "p5", "p6"), fam.floats))
    launches.append(Launch(token_loss_kernel, (programs,),
                           dict(**tokens, rec_ptr=prog_rec, n_rec=programs if batch_stats else 0,
                                row_rec_ptr=row_rec, grad_ptr=grad if write_grad else row_count,
                                row_count_ptr=row_count, partial_ptr=partial, ctx_ptr=ctx,
                                **p, **ranges),
                           dict(**flags, FAMILY=fam.family, OPT=fam.opt, GAMMA_MODE=fam.gamma_mode,
                                BATCH_STATS=batch_stats, ROW_STATS=row_stats, WRITE_GRAD=write_grad,
                                BLOCK_REC=BLOCK_REC, BLOCK_T=_block_t(T, 512))))

    def given(v):
        return -1.0 if v is None else float(v)

    launches.append(Launch(finalize_kernel, (1,),
                           dict(partial_ptr=partial, n_part=programs, ctx_ptr=ctx, row_count_ptr=row_count,
                                row_scale_ptr=row_scale, loss_ptr=loss, metrics_ptr=metrics, R=R, T=T,
                                dp_size=float(agg.dp_size),
                                global_token_count=given(agg.global_token_count),
                                global_batch_size=given(agg.global_batch_size),
                                loss_scale_factor=given(agg.loss_scale_factor)),
                           dict(SEQ_GAMMA=row_stats and fam.family != kf.VESPO, AGG=_AGG_CODE[agg.loss_agg_mode],
                                BLOCK_P=MAX_PROGRAMS, BLOCK_R=1024)))
    return Plan(launches, loss, metrics, grad, row_scale, prog_rec if batch_stats else None)


class _FusedPolicyLoss(torch.autograd.Function):
    """Forward runs the planned launches; backward scales the saved −m·φ."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, response_mask, config):
        x = Inputs(log_prob, old_log_prob, advantages, response_mask, log_prob.shape)
        plan = plan_launches(x, config.family, config.agg, config.clamp, config.write_grad)
        for launch in plan.launches:
            launch()
        ctx.grad_dtype = log_prob.dtype
        ctx.save_for_backward(plan.grad, plan.row_scale)
        ctx.mark_non_differentiable(plan.metrics)
        return plan.loss, plan.metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        neg_phi, row_scale = ctx.saved_tensors
        grad = _empty(neg_phi.shape, ctx.grad_dtype, neg_phi.device)
        torch.mul(neg_phi, (row_scale * grad_loss).unsqueeze(1), out=grad)
        return grad, None, None, None, None


@dataclass(frozen=True)
class _Config:
    family: KernelFamily
    agg: AggConfig
    clamp: float
    write_grad: bool


def fused_policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                      loss_type="is_reshape", loss_agg_mode="token-mean", *, dp_size=1,
                      global_token_count=None, global_batch_size=None, loss_scale_factor=None,
                      log_ratio_clamp=20.0, process_group=None, params=None, **family_params):
    """``irt.policy_loss`` on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    params = make_params(loss_type, params, **family_params)
    agg = AggConfig(loss_agg_mode, dp_size, global_token_count, global_batch_size, loss_scale_factor)
    x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, log_ratio_clamp)
    if process_group is not None:
        raise NotImplementedError("process_group is not supported yet")
    write_grad = torch.is_grad_enabled() and log_prob.requires_grad
    config = _Config(kernel_family(loss_type, params), agg, float(log_ratio_clamp), write_grad)
    loss, metric_vec = _FusedPolicyLoss.apply(x.log_prob, x.old_log_prob, x.advantages,
                                              x.response_mask, config)
    return loss, {name: metric_vec[_METRIC_INDEX[name]] for name in metric_names(loss_type)}


def traffic_model(loss_type: str, dtype: torch.dtype, mask_dtype: Optional[torch.dtype], B: int, T: int,
                  adv_shape: str = "BT", params=None, backward: bool = True) -> int:
    """Tensor bytes the fused op moves for a [B, T] batch (forward + backward).

    Each pass reads every input once (pass 1 only for families with statistics);
    pass 2 writes −m·φ in fp32 (fp64 for fp64), the backward reads it and writes the
    gradient in log_prob's dtype. adv_shape: "BT", "B" or "none". Record and
    partial buffers (O(programs)) are counted too.
    """
    fam = kernel_family(loss_type, make_params(loss_type, params))
    item = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=_acc_dtype(dtype)).element_size()
    n = B * T
    per_pass = 2 * item * n
    per_pass += {"BT": item * n, "B": item * B, "none": 0}[adv_shape]
    if mask_dtype is not None:
        per_pass += torch.empty((), dtype=mask_dtype).element_size() * n
    passes = 2 if fam.needs_stats else 1
    total = passes * per_pass
    if backward:
        total += acc * n + acc * n + item * n
    programs = max(1, min(B, MAX_PROGRAMS))
    total += acc * (programs * (layout.PARTIAL_WIDTH + 2 * layout.S_BASE_WIDTH) + 4 * B)
    return total
