"""gmpo: Geometric-Mean Policy Optimization (verl ``geo_mean``). Each row's ratio is the geometric
mean of its token ratios, each clipped in log space on the side its advantage pushes:
z_t = min(ℓ_t, ε_high) if A_t > 0, max(ℓ_t, −ε_low) if A_t < 0, 0 if A_t = 0;
r_b = exp(Σ_t m_t·z_t / n_b), Ā_b = Σ_t m_t·A_t / n_b, and the row's loss is −Ā_b·r_b (every
token of the row carries it: F_t = Ā_b·r_b). Its gradient is the true one of that loss,
φ_t = Ā_b·r_b·[z_t = ℓ_t] (A_t ≠ 0); under seq-mean-token-mean the loss is verl's mean over
rows. Rollout IS weights enter r_b as their geometric mean over the row (verl's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, const, ones_like


@dataclass(frozen=True)
class GMPOParams(Options):
    """The log-ratio clip [−clip_ratio_low, clip_ratio_high] on A's side (GMPO's (e^−0.4, e^0.4))."""

    clip_ratio_low: float = 0.4
    clip_ratio_high: float = 0.4

    def __post_init__(self):
        set_real(self, "clip_ratio_low", lo=0.0)
        set_real(self, "clip_ratio_high", lo=0.0)


def _clipped(ell, adv, p):
    """z: ℓ clipped on A's side (0 where A = 0)."""
    return torch.where(adv > 0, torch.clamp(ell, max=p.clip_ratio_high),
                       torch.where(adv < 0, torch.clamp(ell, min=-p.clip_ratio_low), 0.0))


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    """log r_b = Σ_t m_t·(z_t + log max(r_t, 1e-8)) / n_b and Ā_b = Σ_t m_t·A_t / n_b (n_b ≥ 1)."""
    mf = mask.to(ell.dtype)
    z = _clipped(ell, adv, p) if log_rollout is None else _clipped(ell, adv, p) + log_rollout
    n = mf.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return {"log_ratio": (mf * z).sum(dim=-1, keepdim=True) / n, "a_mean": (mf * adv).sum(dim=-1, keepdim=True) / n}


def gmpo(ell, adv, *, log_ratio, a_mean, params):
    """F = c + c·[z = ℓ]·(ℓ − sg(ℓ)) with c = Ā·r (value c, gradient φ). Extras: clipfrac (ℓ
    outside the clip with A > 0, verl's ``pg_clipfrac``), clipfrac_lower (the same with A < 0)."""
    p = params
    c = const(a_mean, ell) * torch.exp(const(log_ratio, ell))
    ld = ell.detach()
    passes = ((adv > 0) & (ld <= p.clip_ratio_high)) | ((adv < 0) & (ld >= -p.clip_ratio_low))
    phi = torch.where(passes | torch.isnan(c), c, 0.0)
    F = c + torch.where(passes, c * (ell - ld), 0.0)
    out = (ld < -p.clip_ratio_low) | (ld > p.clip_ratio_high)
    extras = {"clipfrac": (out & (adv > 0)).to(ell.dtype), "clipfrac_lower": (out & (adv < 0)).to(ell.dtype)}
    return TokenTerms(phi, F, ones_like(ell), extras)


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(p.clip_ratio_low, p.clip_ratio_high), needs_stats=True, per_row=True)


FAMILY = Family("gmpo", GMPOParams, gmpo, kernel, stats=stats, extra_metrics=("clipfrac", "clipfrac_lower"),
                row_weight=True, rollout_in_row=True)
