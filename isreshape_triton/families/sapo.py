"""sapo: the soft gate (SPEC §4). τ = τ_pos if A > 0 else τ_neg;
φ = A·w·sech²(τ(w−1)/2), F = A·(4/τ)·σ(τ(w−1)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, const, ones_like, sech2_half, sigmoid


@dataclass(frozen=True)
class SAPOParams(Options):
    """Soft gate: φ = A·w·sech²(τ(w−1)/2), τ = τ_pos if A>0 else τ_neg."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self):
        set_real(self, "tau_pos", lo=0.0, lo_open=True)
        set_real(self, "tau_neg", lo=0.0, lo_open=True)


def sapo(ell, adv, *, params):
    p = params
    tau = torch.where(adv > 0, const(p.tau_pos, ell), const(p.tau_neg, ell))
    ld = ell.detach()
    phi = adv * torch.exp(ld) * sech2_half(tau * torch.expm1(ld))
    F = adv * (4.0 / tau) * sigmoid(tau * torch.expm1(ell))
    return TokenTerms(phi, F, ones_like(ell), {})


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(p.tau_pos, p.tau_neg))


FAMILY = Family("sapo", SAPOParams, sapo, kernel)
