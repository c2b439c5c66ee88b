"""gpg: Group Policy Gradient (verl ``gpg``), REINFORCE on the advantages with no importance
ratio: loss = −A·log π, φ = A.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..family import Family, KernelFamily
from ..options import Options
from ..reference.shared import TokenTerms, ones_like


@dataclass(frozen=True)
class GPGParams(Options):
    """No parameters: loss = −A·log π."""


def gpg(ell, adv, *, params, lp, olp):
    """φ = A, F = A·log π."""
    return TokenTerms(adv.detach(), adv * lp, ones_like(ell), {})


def kernel(p) -> KernelFamily:
    return KernelFamily()


FAMILY = Family("gpg", GPGParams, gpg, kernel, log_probs=True)
