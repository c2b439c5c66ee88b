"""dro: Direct Reward Optimization (verl ``dro``), the policy gradient with a quadratic penalty on
the log-ratio d = log π − log π_old (unclamped): loss = −(A·log π − ½β·d²), φ = A − β·d.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, ones_like


@dataclass(frozen=True)
class DROParams(Options):
    """loss = −(A·log π − ½β·(log π − log π_old)²); verl's ``policy_loss.dro_beta``."""

    beta: float = 0.1

    def __post_init__(self):
        set_real(self, "beta", lo=0.0, lo_open=True)


def dro(ell, adv, *, params, lp, olp):
    """φ = A − β·d, F = A·log π − ½β·d² with d = log π − log π_old."""
    d = lp - olp
    return TokenTerms((adv - params.beta * d).detach(), adv * lp - 0.5 * params.beta * d * d, ones_like(ell), {})


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(p.beta))


FAMILY = Family("dro", DROParams, dro, kernel, log_probs=True)
