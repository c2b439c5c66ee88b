"""is_reshape_tr: the soft trust region (SPEC §4). γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c);
φ = [(1−γ_t) + γ_t·w·sech²(τ_h(w−1)/2)]·A, F = A·[(1−γ_t)ℓ + γ_t·(2/τ_h)·tanh(τ_h(w−1)/2)].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, sech2_half, tanh


@dataclass(frozen=True)
class IsReshapeTRParams(Options):
    """Soft trust region: γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c), sech² shape with τ_h."""

    tau_h: float = 1.0
    tau_c: float = 1.0
    gamma_base: float = 0.1
    gamma_max: float = 0.9

    def __post_init__(self):
        set_real(self, "tau_h", lo=0.0, lo_open=True)
        set_real(self, "tau_c", lo=0.0, lo_open=True)
        set_real(self, "gamma_base", lo=0.0)
        set_real(self, "gamma_max", lo=0.0)
        if self.gamma_base > self.gamma_max:
            raise ValueError(f"gamma_base ({self.gamma_base}) must not exceed gamma_max ({self.gamma_max})")


def is_reshape_tr(ell, adv, *, params):
    """γ_t detached; w − 1 = expm1(ℓ) (accurate near ℓ = 0)."""
    p = params
    ld = ell.detach()
    gamma_t = p.gamma_base + (p.gamma_max - p.gamma_base) * torch.sigmoid(-adv * ld / p.tau_c)
    x = p.tau_h * torch.expm1(ld)  # τ_h(w−1)
    phi = ((1.0 - gamma_t) + gamma_t * torch.exp(ld) * sech2_half(x)) * adv
    F = adv * ((1.0 - gamma_t) * ell + gamma_t * (2.0 / p.tau_h) * tanh(p.tau_h * torch.expm1(ell) / 2.0))
    return TokenTerms(phi, F, gamma_t, {})


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(p.tau_h, p.tau_c, p.gamma_base, p.gamma_max))


FAMILY = Family("is_reshape_tr", IsReshapeTRParams, is_reshape_tr, kernel, gamma_stats=True)
