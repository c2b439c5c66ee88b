"""``policy_loss``: the pure-PyTorch oracle of the fused op (SPEC §2-6).

Flow: validate (params, aggregation options, tensors) → upcast and sanitize
masked positions → ℓ (clamp that passes the gradient) → the family's batch
statistics (detached) → per-token φ, F → aggregate(−F) → metrics.
"""
from __future__ import annotations

import torch

from ..inputs import prepare_inputs
from ..params import AggConfig, make_params
from .aggregation import aggregate
from .diagnostics import compute_metrics
from .families import FAMILIES, STATS, _TAKES_PARAMS, split_psis


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 ``log_prob``, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                loss_type="is_reshape", loss_agg_mode="token-mean", *,
                dp_size=1, global_token_count=None, global_batch_size=None, loss_scale_factor=None,
                log_ratio_clamp=20.0, process_group=None, params=None, **family_params):
    """Aggregated loss (0-dim, fp32 / fp64) and the metrics dict of ``loss_type``.

    ∂loss/∂log_prob_t = −s_t·m_t·φ_t; ``old_log_prob`` and ``advantages`` are
    treated as constants (no gradient flows to them).
    """
    if process_group is not None:
        raise NotImplementedError("process_group is supported on the kernel path")
    p = make_params(loss_type, params, **family_params)
    agg = AggConfig(loss_agg_mode, dp_size, global_token_count, global_batch_size, loss_scale_factor)
    x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, log_ratio_clamp)
    C = float(log_ratio_clamp)
    dt = compute_dtype(x.log_prob)

    # Mask (binarized) and sanitized inputs: masked positions become 0 *before* any
    # arithmetic, so NaN/inf there touch neither values nor gradients.
    if x.response_mask is None:
        mask = torch.ones(x.log_prob.shape, dtype=torch.bool, device=x.log_prob.device)
    else:
        mask = x.response_mask != 0
    lp = torch.where(mask, x.log_prob.to(dt), 0.0)
    olp = torch.where(mask, x.old_log_prob.detach().to(dt), 0.0)
    if x.advantages is None:
        adv = torch.ones_like(lp).detach()
    else:
        adv = torch.where(mask, x.advantages.detach().to(dt), 0.0)

    # ℓ = clamp(d, −C, C) in value, identity in gradient
    d = lp - olp
    ell = d + (torch.clamp(d, -C, C) - d).detach()

    stats, diag = split_psis(STATS[loss_type](ell.detach(), adv, mask, p, C))
    kwargs = {**stats, "params": p} if loss_type in _TAKES_PARAMS else stats
    terms = FAMILIES[loss_type](ell, adv, **kwargs)

    loss = aggregate(-terms.F, mask, agg)
    metrics = compute_metrics(loss_type, ell, adv, mask, terms, {**stats, **diag}, p, dt)
    return loss, metrics
