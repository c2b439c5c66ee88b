"""is_reshape: φ = w^γ·A, F = A·expm1(γℓ)/γ, one γ from the variance of ℓ (SPEC §4).

γ rules: a fixed value, "ess" (closed form from σ²), "ess_exact" (the ESS equation on a grid),
"psis" (Pareto-smoothed); per batch or per row (gamma_granularity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..family import Family, GammaRule, KernelFamily, gamma_mode
from ..options import GammaSpec, Options, set_gamma_rule
from ..reference.gamma import dims_for, select_gamma_k
from ..reference.shared import TokenTerms, batch_or_mean, const, expm1_over, with_psis


@dataclass(frozen=True)
class IsReshapeParams(Options):
    """φ = w^γ·A, F = A·expm1(γℓ)/γ; γ from the batch (or row) variance of ℓ."""

    gamma: GammaSpec = "ess"
    rho_min: float = 0.3
    gamma_min: float = 0.05
    gamma_max: float = 1.0
    gamma_granularity: str = "batch"
    gamma_fallback: float = 0.3  # γ when PSIS finds k̂ > 0.7

    def __post_init__(self):
        set_gamma_rule(self)


def is_reshape(ell, adv, *, gamma, params=None):
    """φ = w^γ·A, F = A·expm1(γℓ)/γ (γ → 0: A·ℓ)."""
    gamma = const(gamma, ell)
    phi = torch.exp(gamma * ell.detach()) * adv
    F = adv * expm1_over(gamma, ell)
    return TokenTerms(phi, F, torch.broadcast_to(gamma, ell.shape), {})


def gamma_stats(p, ell, mask, name: str) -> dict:
    """The γ of the rule of p (is_reshape's γ, is_reshape_var's γ_base) as statistic name."""
    g, k = select_gamma_k(p.gamma, ell, mask, dims_for(p.gamma_granularity), rho_min=p.rho_min,
                          gamma_min=p.gamma_min, gamma_max=p.gamma_max, empty_value=p.gamma_max,
                          fallback=p.gamma_fallback)
    return with_psis({name: g.to(ell.dtype)}, p, k)


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    return gamma_stats(p, ell, mask, "gamma")


def kernel(p, params: tuple = ()) -> KernelFamily:
    """One γ from all tokens (is_reshape's γ, is_reshape_var's γ_base); params: the family's floats."""
    mode = gamma_mode(p.gamma)
    return KernelFamily(params, gamma_rule=GammaRule(p.rho_min, 0.0 if mode != "fixed" else p.gamma, -1.0,
                                                     (p.gamma_min, p.gamma_max)),
                        gamma_mode=mode, needs_stats=mode in ("ess", "ess_exact"),
                        per_row=p.gamma_granularity == "sequence")


def metrics(ell, adv, mask, terms, stats, p) -> dict:
    return {"gamma": batch_or_mean(stats["gamma"], mask, p)}


FAMILY = Family("is_reshape", IsReshapeParams, is_reshape, kernel, stats=stats, metrics=("gamma",),
                reference_metrics=metrics, gamma_stats=True)
