"""Loss aggregation (SPEC §5): verl's ``agg_loss`` modes, written literally.

``aggregate(L, mask, agg)`` is the value; ``agg_scale(mask, agg)`` is
s_t = ∂aggregate/∂L_t, the scale in the gradient convention
∂loss/∂log_prob_t = −s_t·m_t·φ_t. Defaults (``None`` in :class:`AggConfig`):
global_token_count = local Σm, global_batch_size = local number of rows with
n_b > 0, loss_scale_factor = T. An empty (zero) denominator gives 0, never NaN (unless
a counted token is NaN).
A count given as a 0-dim tensor whose value is bad (NaN, negative, ±inf; a number
would have been rejected by :class:`AggConfig`) gives NaN: loud, as the kernels.
"""
from __future__ import annotations

import torch

from ..params import AggConfig


def _safe_div(num: torch.Tensor, den) -> torch.Tensor:
    """num/den, and 0·num where den == 0: 0 for a finite num (gradient 0 there too), NaN for a
    non-finite one (a NaN token stays loud behind an empty denominator, as in the kernels)."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0 * num)


def _count(value, dtype):
    """A given count: a number as is (validated finite and >= 0), a tensor in ``dtype`` with a
    bad value (NaN, negative, ±inf) replaced by NaN."""
    if not isinstance(value, torch.Tensor):
        return value
    c = value.to(dtype)
    return torch.where((c >= 0) & (c < float("inf")), c, float("nan"))


def _denominators(mask: torch.Tensor, agg: AggConfig, dtype):
    mf = mask.to(dtype)
    n_b = mf.sum(dim=-1)  # [R]
    gtc = mf.sum() if agg.global_token_count is None else _count(agg.global_token_count, dtype)
    gbs = (n_b > 0).to(dtype).sum() if agg.global_batch_size is None else _count(agg.global_batch_size, dtype)
    lsf = mask.shape[-1] if agg.loss_scale_factor is None else agg.loss_scale_factor
    return mf, n_b, gtc, gbs, lsf


def aggregate(L: torch.Tensor, mask: torch.Tensor, agg: AggConfig) -> torch.Tensor:
    """The aggregated loss (0-dim) of per-token losses ``L`` ``[R, T]`` (finite everywhere)."""
    mf, n_b, gtc, gbs, lsf = _denominators(mask, agg, L.dtype)
    Lm = L * mf
    mode, dp = agg.loss_agg_mode, agg.dp_size
    if mode == "token-mean":
        return _safe_div(Lm.sum(), gtc) * dp
    if mode == "token-sum":
        return Lm.sum() * dp
    row_sum = Lm.sum(dim=-1)  # Σ_t L·m per row
    if mode == "seq-mean-token-sum":
        return _safe_div(row_sum.sum(), gbs) * dp
    if mode == "seq-mean-token-mean":
        return _safe_div(_safe_div(row_sum, n_b).sum(), gbs) * dp
    if mode == "seq-mean-token-sum-norm":
        return _safe_div(_safe_div(row_sum.sum(), gbs), lsf) * dp
    raise ValueError(f"unknown loss_agg_mode {mode!r}")  # pragma: no cover


def agg_scale(mask: torch.Tensor, agg: AggConfig, dtype=torch.float64) -> torch.Tensor:
    """s_t·m_t = ∂aggregate/∂L_t, shape ``[R, T]`` (0 at masked tokens)."""
    mf, n_b, gtc, gbs, lsf = _denominators(mask, agg, dtype)
    one = torch.ones((), dtype=dtype, device=mask.device)
    mode, dp = agg.loss_agg_mode, agg.dp_size
    if mode == "token-mean":
        s = _safe_div(one, gtc)
    elif mode == "token-sum":
        s = one
    elif mode == "seq-mean-token-sum":
        s = _safe_div(one, gbs)
    elif mode == "seq-mean-token-mean":
        s = _safe_div(_safe_div(one, n_b), gbs)[:, None]
    else:
        s = _safe_div(_safe_div(one, gbs), lsf)
    return mf * s * dp
