"""From logits (SPEC §8), in plain PyTorch: the oracle of the fused op.

    z = logits / temperature,  log p = log_softmax(z),
    log_prob_t = log p[label_t]            (NaN where label_t ∉ [0, V): never an index),
    H_t = −Σ_v p_v·log p_v                 (differentiable: ∂H/∂z = −p·(z − Σp·z)),
then ``reference.policy_loss`` on log_prob. Logits are upcast to float32 (float64 for
float64) before any arithmetic.

``check_logits_inputs`` validates the arguments for both paths (SPEC §11: errors
name the argument).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.autograd.function import once_differentiable

from ..params import check_loss_agg_mode, check_loss_type, check_process_group
from .loss import policy_loss

KERNEL_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits_inputs(logits, labels, old_log_prob, temperature, return_entropy=False,
                        inplace_backward=False, kernel=True, tp_group=None, cu_seqlens=None) -> None:
    """Types, shapes and devices of the from-logits arguments (the log-prob op checks the rest)."""
    check_process_group(tp_group, "tp_group")
    dtypes = KERNEL_LOGIT_DTYPES if kernel else KERNEL_LOGIT_DTYPES + (torch.float64,)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in dtypes:
        raise TypeError(f"logits must have a dtype in {[str(d) for d in dtypes]}, got {logits.dtype}")
    if logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [B, T, V] or packed [N, V] with V >= 1, got {tuple(logits.shape)}")
    if cu_seqlens is not None and logits.dim() != 2:
        raise ValueError("with cu_seqlens, logits must be packed [N, V] (labels and old_log_prob [N]), got "
                         f"logits shape {tuple(logits.shape)}")
    lead = logits.shape[:-1]
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits' leading shape {tuple(lead)}")
    tensors = {"labels": labels}
    if old_log_prob is not None:  # None: selective_log_softmax alone
        if not isinstance(old_log_prob, torch.Tensor):
            raise TypeError(f"old_log_prob must be a torch.Tensor, got {type(old_log_prob).__name__}")
        if old_log_prob.shape != lead:
            raise ValueError(f"old_log_prob shape {tuple(old_log_prob.shape)} must equal logits' leading "
                             f"shape {tuple(lead)}")
        tensors["old_log_prob"] = old_log_prob
    for name, t in tensors.items():
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, flag in (("return_entropy", return_entropy), ("inplace_backward", inplace_backward)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if inplace_backward and logits.stride(-1) != 1:
        raise ValueError("inplace_backward=True needs logits with a unit stride in the vocabulary "
                         f"dimension, got stride {logits.stride(-1)}")
    if inplace_backward and 0 in logits.stride():
        raise ValueError("inplace_backward=True needs logits without broadcast (stride-0) dimensions")


def check_token_shapes(labels, advantages, response_mask, options) -> None:
    """The per-token inputs of the log-prob op against ``labels``' shape, so that an error
    names ``labels`` (the log-prob op would name its internal ``log_prob``). Packed
    (``cu_seqlens`` in ``options``) advantages may be per token [N] or per sequence [S]:
    the log-prob op checks them."""
    shape = labels.shape
    given = {"response_mask": response_mask, **{name: options.get(name) for name in (
        "rollout_is_weights", "rollout_log_prob", "ref_log_prob")}}
    for name, t in given.items():
        if isinstance(t, torch.Tensor) and t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal labels shape {tuple(shape)}")
    if isinstance(advantages, torch.Tensor) and options.get("cu_seqlens") is None \
            and advantages.shape not in (shape, shape[:-1]):
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must equal labels shape {tuple(shape)} "
                         f"or its leading shape {tuple(shape[:-1])}")


def _log_prob_entropy(logits, labels, temperature):
    """(log_prob, entropy) of the rows of ``logits`` (int64 ``labels``), differentiable.

    An out-of-range label indexes column 0 and adds NaN, so its log_prob is NaN *and* a
    gradient reaching it is NaN on the whole row (as on the kernel path), never 0."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dt) / float(temperature)
    log_p = torch.log_softmax(z, dim=-1)
    V = logits.shape[-1]
    valid = (labels >= 0) & (labels < V)
    index = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    log_prob = log_p.gather(-1, index).squeeze(-1) + torch.where(valid, 0.0, math.nan).to(dt)
    p = log_p.exp()
    live = p > 0  # p·log p → 0 at p = 0 (a −inf logit), with a finite gradient
    entropy = -(p * torch.where(live, log_p, 0.0)).sum(-1)
    return log_prob, entropy


class _DeadRowsZero(torch.autograd.Function):
    """``_log_prob_entropy`` whose backward gives a token with no gradient on either output
    (g = g_H = 0: a masked token) an exact-zero row, as the kernel does, whatever its logits
    (NaN or ±inf logits there never reach the gradient: 0·NaN would be NaN). The other rows
    get autograd's gradient of ``_log_prob_entropy`` (recomputed in the backward). With
    ``inplace`` the gradient is copied into the logits' storage, an in-place write that
    autograd sees (the kernel path bumps the logits' version the same way)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, inplace):
        ctx.save_for_backward(logits, labels)
        ctx.temperature, ctx.inplace = temperature, inplace
        return _log_prob_entropy(logits, labels, temperature)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, g_h):
        logits, labels = ctx.saved_tensors
        live = (g != 0) | (g_h != 0)
        with torch.enable_grad():
            z = logits.detach().requires_grad_()
            z_live = torch.where(live.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype))
            log_prob, entropy = _log_prob_entropy(z_live, labels, ctx.temperature)
            (grad,) = torch.autograd.grad((log_prob, entropy), z, (g, g_h))
        if ctx.inplace:
            grad = logits.detach().copy_(grad)
        return grad, None, None, None


def selective_log_softmax(logits, labels, temperature=1.0, *, inplace_backward=False):
    """(log_prob, entropy), both ``logits.shape[:-1]`` in float32 (float64 for float64).
    Labels of any integer dtype (unsigned ones included) are read as int64.
    ``inplace_backward``: the backward writes grad_logits into the logits' storage."""
    labels = labels.to(torch.int64)
    if logits.requires_grad and torch.is_grad_enabled():
        return _DeadRowsZero.apply(logits, labels, temperature, inplace_backward)
    return _log_prob_entropy(logits, labels, temperature)


def policy_loss_from_logits(logits, labels, old_log_prob, advantages=None, response_mask=None,
                            loss_type="is_reshape", loss_agg_mode="token-mean", temperature=1.0,
                            return_entropy=False, inplace_backward=False, tp_group=None,
                            cu_seqlens=None, **options):
    """``irt.policy_loss_from_logits`` in PyTorch: (loss, metrics[, entropy]), with the
    same ``inplace_backward`` semantics."""
    check_process_group(tp_group, "tp_group")
    if tp_group is not None:
        raise NotImplementedError("tp_group is supported on the kernel path")
    check_logits_inputs(logits, labels, old_log_prob, temperature, return_entropy, inplace_backward,
                        kernel=False, cu_seqlens=cu_seqlens)
    check_loss_type(loss_type)  # before the logits pass, as on the kernel path
    check_loss_agg_mode(loss_agg_mode)
    if cu_seqlens is not None:
        options["cu_seqlens"] = cu_seqlens
    check_token_shapes(labels, advantages, response_mask, options)
    log_prob, entropy = selective_log_softmax(logits, labels, temperature, inplace_backward=inplace_backward)
    loss, metrics = policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_type,
                                loss_agg_mode, **options)
    return (loss, metrics, entropy) if return_entropy else (loss, metrics)
