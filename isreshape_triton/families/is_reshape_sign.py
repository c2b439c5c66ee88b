"""is_reshape_sign: sign-dependent shapes (SPEC §4). A>0: w^{γ+}·A (or Michaelis-Menten);
A<0: b(w)·A with the chosen saturation of w^{γ−}; A=0: 0. γ+ and γ− = 1 + δ each from their
own group's variance of ℓ (or fixed), per batch or per row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..family import Family, GammaRule, KernelFamily, floats, gamma_mode
from ..options import GAMMA_MODES, GRANULARITIES, Options, check_choice, set_real
from ..reference.gamma import SIGN_NEG_DELTA_BOUNDS, SIGN_POS_BOUNDS, dims_for, masked_moments, sign_gammas
from ..reference.shared import ALL, TokenTerms, batch_or_mean, const, ess, expm1_over, scalar, with_psis

NEG_SATURATIONS = ("none", "soft", "truncate", "michaelis_menten")
POS_WEIGHTS = ("power", "michaelis_menten")


@dataclass(frozen=True)
class IsReshapeSignParams(Options):
    """Sign-dependent shapes: A>0 → w^{γ+}·A (or Michaelis-Menten), A<0 → b(w)·A."""

    gamma: str = "ess"  # rule for γ+ / γ− not fixed below: "ess", "ess_exact" or "psis"
    gamma_pos: Optional[float] = None  # fixed γ+ (else from σ²₊)
    gamma_neg: Optional[float] = None  # fixed γ− (else from σ²₋)
    rho_min: float = 0.3
    gamma_granularity: str = "batch"
    neg_saturation: str = "soft"
    pos_weight: str = "power"
    saturation_lambda: float = 1.0  # λ of the soft saturation
    saturation_w_th: float = 3.0  # w_th of the soft saturation
    truncate_max: float = 10.0  # M of the truncate saturation
    mm_tau: float = 1.0  # τ of Michaelis-Menten (1+τ)w/(τ+w)
    gamma_fallback: float = 0.3  # γ+ when PSIS finds k̂ > 0.7 (γ− falls back to 1 + gamma_fallback)

    def __post_init__(self):
        set_real(self, "gamma_fallback", lo=0.0, hi=1.0)
        if not isinstance(self.gamma, str) or self.gamma not in GAMMA_MODES:
            raise ValueError(f"gamma must be one of {GAMMA_MODES} for is_reshape_sign "
                             f"(fix gamma_pos/gamma_neg instead), got {self.gamma!r}")
        set_real(self, "rho_min", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_choice("gamma_granularity", self.gamma_granularity, GRANULARITIES)
        check_choice("neg_saturation", self.neg_saturation, NEG_SATURATIONS)
        check_choice("pos_weight", self.pos_weight, POS_WEIGHTS)
        set_real(self, "gamma_pos", optional=True, lo=0.0)
        set_real(self, "gamma_neg", optional=True, lo=0.0)
        for name in ("saturation_lambda", "saturation_w_th", "mm_tau"):
            set_real(self, name, lo=0.0, lo_open=True)
        set_real(self, "truncate_max", lo=1.0)


def _power_weight(gamma, ell):
    """b = w^γ and ∫₁^w b(u)/u du = expm1(γℓ)/γ."""
    return torch.exp(gamma * ell.detach()), expm1_over(gamma, ell)


def _michaelis_menten_weight(tau, ell):
    """b = (1+τ)w/(τ+w) and ∫₁^w b(u)/u du = (1+τ)·ln((τ+w)/(τ+1))."""
    w = torch.exp(ell.detach())
    b = (1.0 + tau) * w / (tau + w)
    integral = (1.0 + tau) * torch.log1p(torch.expm1(ell) / (1.0 + tau))
    return b, integral


def _truncated_power_weight(gamma, M, ell):
    """b = min(w^γ, M); ∫ = expm1(γℓ)/γ while w^γ ≤ M, else (M−1)/γ + M·(ℓ − ln M/γ)."""
    ld = ell.detach()
    b = torch.clamp(torch.exp(gamma * ld), max=M)
    below = gamma * ld <= math.log(M)
    g_safe = torch.where(gamma == 0, 1.0, gamma)
    above = (M - 1.0) / g_safe + M * (ell - math.log(M) / g_safe)
    return b, torch.where(below, expm1_over(gamma, ell), above)


def _soft_saturated_weight(gamma, lam, w_th, ell):
    """b = β·w^γ + (1−β)·w, β = σ(−λ(w − w_th)); surrogate: ∫ replaced by sg(b)·ℓ."""
    w = torch.exp(ell.detach())
    beta = torch.sigmoid(-lam * (w - w_th))
    b = beta * torch.exp(gamma * ell.detach()) + (1.0 - beta) * w
    return b, b * ell


def is_reshape_sign(ell, adv, *, gamma_pos, gamma_neg, params):
    """A>0: w^{γ+}·A (or Michaelis-Menten); A<0: b(w)·A (neg_saturation); A=0: 0."""
    p = params
    gamma_pos, gamma_neg = const(gamma_pos, ell), const(gamma_neg, ell)
    pos, neg = adv > 0, adv < 0
    # each group's γ only where it applies: a NaN γ of one group (a non-finite token in it)
    # must not reach the other group's gradient through torch.where's backward (0·NaN)
    g_pos, g_neg = torch.where(pos, gamma_pos, 1.0), torch.where(neg, gamma_neg, 1.0)
    if p.pos_weight == "power":
        b_pos, int_pos = _power_weight(g_pos, ell)
    else:
        b_pos, int_pos = _michaelis_menten_weight(p.mm_tau, ell)
    if p.neg_saturation == "none":
        b_neg, int_neg = _power_weight(g_neg, ell)
    elif p.neg_saturation == "soft":
        b_neg, int_neg = _soft_saturated_weight(g_neg, p.saturation_lambda, p.saturation_w_th, ell)
    elif p.neg_saturation == "truncate":
        b_neg, int_neg = _truncated_power_weight(g_neg, p.truncate_max, ell)
    else:  # michaelis_menten
        b_neg, int_neg = _michaelis_menten_weight(p.mm_tau, ell)
    phi = torch.where(pos, adv * b_pos, torch.where(neg, adv * b_neg, 0.0))
    F = torch.where(pos, adv * int_pos, torch.where(neg, adv * int_neg, 0.0))
    gamma_t = torch.where(adv >= 0, gamma_pos, gamma_neg)
    return TokenTerms(phi, F, torch.broadcast_to(gamma_t, ell.shape), {})


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    g_pos, g_neg, k_pos, k_neg = sign_gammas(ell, adv, mask, p, dims_for(p.gamma_granularity), return_k=True)
    return with_psis({"gamma_pos": g_pos.to(ell.dtype), "gamma_neg": g_neg.to(ell.dtype)}, p, k_pos, k_neg)


def kernel(p) -> KernelFamily:
    """OPT = neg_saturation's index + 4·(pos_weight = michaelis_menten)."""
    fixed = p.gamma_pos is not None and p.gamma_neg is not None
    mode = gamma_mode(p.gamma)
    rule = GammaRule(p.rho_min, -1.0 if p.gamma_pos is None else p.gamma_pos,
                     -1.0 if p.gamma_neg is None else p.gamma_neg, SIGN_POS_BOUNDS[:2], SIGN_NEG_DELTA_BOUNDS[:2])
    return KernelFamily(floats(p.saturation_lambda, p.saturation_w_th, p.truncate_max, p.mm_tau),
                        opt=NEG_SATURATIONS.index(p.neg_saturation) + 4 * (p.pos_weight == "michaelis_menten"),
                        gamma_rule=rule, gamma_mode=mode, needs_stats=not fixed and mode != "psis",
                        per_row=p.gamma_granularity == "sequence", sign_groups=True,
                        extra_terms=2 if p.gamma_granularity == "sequence" else 0)  # γ± per sequence


def metrics(ell, adv, mask, terms, stats, p) -> dict:
    """γ± (batch values or token means), and σ² and the ESS of ℓ (at γ_t) per sign group."""
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    m = {"gamma_pos": batch_or_mean(stats["gamma_pos"], pos, p),
         "gamma_neg": batch_or_mean(stats["gamma_neg"], neg, p),
         "sigma_sq_pos": scalar(masked_moments(ell, pos, ALL)[2]),
         "sigma_sq_neg": scalar(masked_moments(ell, neg, ALL)[2])}
    m["ess_pos"], m["ess_ratio_pos"] = ess(terms.gamma_t * ell, pos)
    m["ess_neg"], m["ess_ratio_neg"] = ess(terms.gamma_t * ell, neg)
    return m


FAMILY = Family("is_reshape_sign", IsReshapeSignParams, is_reshape_sign, kernel, stats=stats,
                metrics=("gamma_pos", "gamma_neg", "sigma_sq_pos", "sigma_sq_neg", "ess_pos", "ess_ratio_pos",
                         "ess_neg", "ess_ratio_neg"),
                reference_metrics=metrics, gamma_stats=True)
