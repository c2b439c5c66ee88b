"""vespo: a sequence weight per row (SPEC §4). φ_t = φ(W_b)·A_t with
φ(W) = W^k·exp(λ(1−W)), log W_b = clamp(Σ_t m_t·ℓ_t, ±C); (k, λ) by the sign of the row's first
counted advantage; surrogate F = sg(φ)·ℓ. Rollout IS weights enter W, not each token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, const, ones_like


@dataclass(frozen=True)
class VESPOParams(Options):
    """Sequence weight φ(W) = W^k·exp(λ(1−W)), W = exp(clamp(Σ m·ℓ, ±C)) per row."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0

    def __post_init__(self):
        for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
            set_real(self, name, lo=0.0)


def vespo(ell, adv, *, log_W, first_adv, params):
    """φ(W) = exp(k·log W + λ(1−W)); NaN if the row's first counted advantage is not finite
    (its sign is unknown: SPEC §11)."""
    p = params
    log_W, first_adv = const(log_W, ell), const(first_adv, ell)
    nonneg = first_adv >= 0
    k = torch.where(nonneg, const(p.k_pos, ell), const(p.k_neg, ell))
    lam = torch.where(nonneg, const(p.lambda_pos, ell), const(p.lambda_neg, ell))
    phi_row = torch.exp(k * log_W + lam * (1.0 - torch.exp(log_W)))
    phi_row = torch.where(torch.isfinite(first_adv), phi_row, math.nan)
    phi = phi_row * adv
    return TokenTerms(phi, phi * ell, ones_like(ell), {})


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    """log W_b = clamp(Σ_t m_t (ℓ_t + log max(r_t, 1e-8)), ±C) (rollout IS weights r, when
    given, folded in before the clamp); A of each row's first counted token."""
    mf = mask.to(ell.dtype)
    z = ell if log_rollout is None else ell + log_rollout
    log_W = torch.clamp((mf * z).sum(dim=-1, keepdim=True), -log_ratio_clamp, log_ratio_clamp)
    first = mask & (torch.cumsum(mf, dim=-1) == 1)
    first_adv = torch.where(first, adv, 0.0).sum(dim=-1, keepdim=True)
    return {"log_W": log_W, "first_adv": first_adv}


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(p.k_pos, p.lambda_pos, p.k_neg, p.lambda_neg), needs_stats=True, per_row=True)


FAMILY = Family("vespo", VESPOParams, vespo, kernel, stats=stats, row_weight=True, rollout_in_row=True)
