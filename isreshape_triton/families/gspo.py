"""gspo: Group Sequence Policy Optimization in its token form (verl ``gspo``; TRL
``importance_sampling_level="sequence"``, OpenRLHF ``gspo``). One ratio per sequence,
s = exp(min(Σ_t m·ℓ_t / n, log_ratio_max)), the geometric mean of the token ratios with its log
clamped as verl does; every token of the row is clipped PPO-style on it with its own advantage,
loss = max(−A·s', −A·clip(s, 1−ε_low, 1+ε_high)) with s' = min(s, δ) (TRL's ``delta``; s' = s
without it); for A<0 with ``clip_ratio_c`` (OpenRLHF's ``dual_clip``) min(that, −A·c). The
gradient of a token is that of verl's s_t = sg(s)·π_t/sg(π_t): φ = A·s where the unclipped
branch is active, s' = s, log s ≤ log_ratio_max and the dual clip is not, else 0. With one
advantage per sequence this is GSPO's sequence objective (TRL, OpenRLHF) under every
aggregation. Rollout IS weights scale each token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, const, ones_like
from .ppo_clip import clipped_branches, dual_clipped


@dataclass(frozen=True)
class GSPOParams(Options):
    """PPO's clip on the sequence ratio s = exp(mean_t ℓ_t) (GSPO's ε: 3e-4 / 4e-4)."""

    clip_ratio_low: float = 3e-4
    clip_ratio_high: float = 4e-4
    log_ratio_max: float = 10.0  # verl's clamp of log s
    delta: Optional[float] = None  # TRL's delta: the unclipped ratio capped at δ
    clip_ratio_c: Optional[float] = None  # OpenRLHF's dual_clip: −A·c bounds the loss for A<0 (None: off)

    def __post_init__(self):
        set_real(self, "clip_ratio_low", lo=0.0, hi=1.0, hi_open=True)
        set_real(self, "clip_ratio_high", lo=0.0)
        set_real(self, "log_ratio_max", lo=-87.0, hi=88.0)  # exp stays a finite, nonzero fp32
        set_real(self, "delta", optional=True, lo=0.0, lo_open=True)
        set_real(self, "clip_ratio_c", optional=True, lo=1.0, lo_open=True)


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    """log s before the clamp: Σ_t m_t·ℓ_t / max(n, 1) per row."""
    mf = mask.to(ell.dtype)
    return {"log_s": (mf * ell).sum(dim=-1, keepdim=True) / mf.sum(dim=-1, keepdim=True).clamp_min(1.0)}


def gspo(ell, adv, *, log_s, params):
    """verl's construction s_t = exp(min(sg(log s) + ℓ − sg(ℓ), log_ratio_max)), written as
    exp(min(log s, log_ratio_max))·exp(g·(ℓ − sg(ℓ))) with g = 0 above log_ratio_max, else 1: the
    same value and gradient, and a NaN log s gives a NaN gradient on its whole row (SPEC §11;
    a clamp's backward would give 0). Extras: clipfrac (the clipped branch is the larger loss,
    verl's ``pg_clipfrac``) and clipfrac_lower (the dual clip active)."""
    p = params
    log_s = const(log_s, ell)
    g = torch.where(log_s > p.log_ratio_max, 0.0, 1.0).to(ell.dtype)
    s = torch.exp(torch.clamp(log_s, max=p.log_ratio_max)) * torch.exp(g * (ell - ell.detach()))
    sd = s.detach()
    capped, unclipped, clipped = clipped_branches(s, adv, p)
    take_unclipped = (unclipped.detach() >= clipped.detach()) | torch.isnan(sd)
    loss, dual = dual_clipped(torch.where(take_unclipped, unclipped, clipped), adv, p)
    passes = (log_s <= p.log_ratio_max) & (sd == capped.detach()) & ~dual
    phi = torch.where(torch.isnan(sd), math.nan, torch.where(take_unclipped & passes, adv * sd, 0.0))
    return TokenTerms(phi, -loss, ones_like(ell), {"clipfrac": (clipped.detach() > unclipped.detach()).to(ell.dtype),
                                                   "clipfrac_lower": dual.to(ell.dtype)})


def kernel(p) -> KernelFamily:
    """OPT = delta + 2·dual clip."""
    delta, dual = p.delta is not None, p.clip_ratio_c is not None
    return KernelFamily(floats(p.clip_ratio_low, p.clip_ratio_high, p.log_ratio_max, p.delta if delta else 0.0,
                               p.clip_ratio_c if dual else 0.0),
                        opt=int(delta) + 2 * int(dual), needs_stats=True, per_row=True)


FAMILY = Family("gspo", GSPOParams, gspo, kernel, stats=stats, extra_metrics=("clipfrac", "clipfrac_lower"),
                row_weight=True)
