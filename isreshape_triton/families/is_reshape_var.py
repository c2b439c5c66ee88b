"""is_reshape_var: the variational γ*(w, A) (SPEC §4). Soft four-case indicators
p_hi = σ(Tℓ), p_lo = σ(−Tℓ), p_pos = σ(T·A), p_neg = σ(−T·A); γ_t = clip(γ_base·(p2+p3) + p4, 0, 1),
φ = w^{γ_t}·A, F = A·expm1(γ_tℓ)/γ_t; γ_base by is_reshape's γ rule.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..family import Family, KernelFamily, floats
from ..options import GammaSpec, Options, set_gamma_rule, set_real
from ..reference.shared import TokenTerms, batch_or_mean, const, expm1_over
from . import is_reshape


@dataclass(frozen=True)
class IsReshapeVarParams(Options):
    """Variational γ*(w, A): γ_t = clip(γ_base·(p2+p3) + p4, 0, 1), γ_base from σ²."""

    gamma: GammaSpec = "ess"  # rule for γ_base
    rho_min: float = 0.3
    gamma_min: float = 0.0  # bounds of γ_base
    gamma_max: float = 1.0
    temperature: float = 5.0  # T of the soft case indicators σ(T·ℓ), σ(T·A)
    gamma_granularity: str = "batch"
    gamma_fallback: float = 0.3  # γ_base when PSIS finds k̂ > 0.7

    def __post_init__(self):
        set_gamma_rule(self)
        set_real(self, "temperature", lo=0.0, lo_open=True)


def is_reshape_var(ell, adv, *, gamma_base, params):
    """γ_t (detached) from the case probabilities p1..p4 (extras: their means are metrics)."""
    T = params.temperature
    ld = ell.detach()
    p_hi, p_lo = torch.sigmoid(T * ld), torch.sigmoid(-T * ld)
    p_pos, p_neg = torch.sigmoid(T * adv), torch.sigmoid(-T * adv)
    p1, p2, p3, p4 = p_hi * p_pos, p_hi * p_neg, p_lo * p_pos, p_lo * p_neg
    gamma_t = torch.clamp(const(gamma_base, ell) * (p2 + p3) + p4, 0.0, 1.0)
    phi = torch.exp(gamma_t * ld) * adv
    F = adv * expm1_over(gamma_t, ell)
    extras = {"p_case1": p1, "p_case2": p2, "p_case3": p3, "p_case4": p4}
    return TokenTerms(phi, F, gamma_t, extras)


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    return is_reshape.gamma_stats(p, ell, mask, "gamma_base")


def kernel(p) -> KernelFamily:
    fam = is_reshape.kernel(p, floats(p.temperature))
    return replace(fam, extra_terms=5 if fam.per_row else 0)  # per sequence, γ_base (extra 4) too


def metrics(ell, adv, mask, terms, stats, p) -> dict:
    return {"gamma_base": batch_or_mean(stats["gamma_base"], mask, p)}


FAMILY = Family("is_reshape_var", IsReshapeVarParams, is_reshape_var, kernel, stats=stats,
                metrics=("gamma_base",), extra_metrics=("p_case1", "p_case2", "p_case3", "p_case4"),
                reference_metrics=metrics,
                gamma_stats=True)
