"""The metrics dict (SPEC §6, definitions in ``isreshape_triton/metrics.py``).

Masked reductions over the counted tokens in float64 on detached values, cast
to the output dtype (float32, float64 for float64 inputs). Empty batch: 0 for
every metric except the batch γ values (``gamma``, ``gamma_pos``,
``gamma_neg``, ``gamma_base`` with ``gamma_granularity="batch"``), which follow
their rule.
"""
from __future__ import annotations

import torch

from ..metrics import metric_names
from .families import TokenTerms
from .gamma import masked_amax, masked_amin, masked_moments

ALL = (0, 1)


def _mean(x, mf, n):
    """Σ m·x / n over the counted tokens (0 when n = 0)."""
    s = (torch.broadcast_to(x.to(torch.float64), mf.shape) * mf).sum()
    return torch.where(n > 0, s / n.clamp_min(1.0), 0.0)


def _scalar(x):
    return x.reshape(())


def compute_metrics(loss_type: str, ell: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    terms: TokenTerms, stats: dict, params, out_dtype) -> dict:
    """``{name: 0-dim tensor}`` with exactly ``metric_names(loss_type)``, in that order."""
    ell = ell.detach().to(torch.float64)
    mf = mask.to(torch.float64)
    n = mf.sum()
    w = torch.exp(ell)
    phi = terms.phi.detach().to(torch.float64)
    gamma_t = torch.broadcast_to(terms.gamma_t.detach().to(torch.float64), ell.shape)

    # ESS at the effective exponent: ω = w^γ_t, shifted by max γ_t·ℓ (ratio is scale free)
    z = gamma_t * ell
    om = torch.where(mask, torch.exp(z - masked_amax(z, mask, ALL)), 0.0)
    s1, s2 = om.sum(), (om * om).sum()
    ess = torch.where(s2 > 0, s1 * s1 / torch.where(s2 > 0, s2, 1.0), 0.0)

    m = {
        "token_count": n,
        "ppo_kl": _mean(-ell, mf, n),
        "w_mean": _mean(w, mf, n),
        "w_max": _scalar(masked_amax(w, mask, ALL)),
        "phi_mean": _mean(phi, mf, n),
        "phi_abs_max": _scalar(masked_amax(phi.abs(), mask, ALL)),
        "sigma_sq": _scalar(masked_moments(ell, mask, ALL)[2]),
        "ess": ess,
        "ess_ratio": torch.where(n > 0, ess / n.clamp_min(1.0), 0.0),
    }
    if loss_type in ("is_reshape", "is_reshape_sign", "is_reshape_tr", "is_reshape_var"):
        m["gamma_mean"] = _mean(gamma_t, mf, n)
        m["gamma_min"] = _scalar(masked_amin(gamma_t, mask, ALL))
        m["gamma_max"] = _scalar(masked_amax(gamma_t, mask, ALL))
    batch = getattr(params, "gamma_granularity", "batch") == "batch"

    def batch_or_mean(value, group):
        # the batch value, or (per-row values) its token mean over the group's counted tokens
        if batch:
            return _scalar(value.to(torch.float64))
        g = group.to(torch.float64)
        return _mean(value, g, g.sum())

    if loss_type == "is_reshape":
        m["gamma"] = batch_or_mean(stats["gamma"], mask)
    elif loss_type == "is_reshape_sign":
        pos, neg = mask & (adv > 0), mask & (adv < 0)
        m["gamma_pos"] = batch_or_mean(stats["gamma_pos"], pos)
        m["gamma_neg"] = batch_or_mean(stats["gamma_neg"], neg)
        m["sigma_sq_pos"] = _scalar(masked_moments(ell, pos, ALL)[2])
        m["sigma_sq_neg"] = _scalar(masked_moments(ell, neg, ALL)[2])
    elif loss_type == "is_reshape_var":
        m["gamma_base"] = batch_or_mean(stats["gamma_base"], mask)
    if loss_type in ("is_reshape_var", "ppo_clip"):
        for key, value in terms.extras.items():
            m[key] = _mean(value.detach(), mf, n)

    names = metric_names(loss_type)
    assert set(m) == set(names), (sorted(m), names)
    return {k: m[k].to(out_dtype) for k in names}
