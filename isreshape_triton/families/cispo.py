"""cispo: clipped IS-weight policy optimization (MiniMax-M1), loss = −sg(clip(w, lo, hi))·A·log π:
the clipped weight only scales the gradient, φ = clip(w, lo, hi)·A, and every token keeps one.
verl's ``cispo`` clips on both sides (lo = 1 − clip_ratio_low, hi = 1 + clip_ratio_high); TRL's
and Liger's clip above only (``clip_ratio_low=None``, hi = ``epsilon_high``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, ones_like


@dataclass(frozen=True)
class CISPOParams(Options):
    """φ = clip(w, 1 − clip_ratio_low, 1 + clip_ratio_high)·A; ``clip_ratio_low=None``: no lower clip."""

    clip_ratio_low: Optional[float] = 0.2  # None: clip above only (TRL, Liger)
    clip_ratio_high: float = 0.2

    def __post_init__(self):
        set_real(self, "clip_ratio_low", optional=True, lo=0.0, hi=1.0, hi_open=True)
        set_real(self, "clip_ratio_high", lo=0.0)

    @property
    def bounds(self) -> tuple:
        """(lo, hi) of the clipped weight, computed once in double precision as verl does."""
        return (0.0 if self.clip_ratio_low is None else 1.0 - self.clip_ratio_low), 1.0 + self.clip_ratio_high


def cispo(ell, adv, *, params, lp, olp):
    """φ = c·A, F = sg(c)·A·log π with c = clip(w, lo, hi). Extras: clipfrac (c ≠ w, verl's
    ``pg_clipfrac``), clipfrac_upper (w > hi and A > 0, TRL's ``cispo_clip_ratio``)."""
    lo, hi = params.bounds
    w = torch.exp(ell.detach())
    c = torch.clamp(w, lo, hi)
    extras = {"clipfrac": (c != w).to(ell.dtype), "clipfrac_upper": ((w > hi) & (adv > 0)).to(ell.dtype)}
    return TokenTerms(c * adv, c * adv * lp, ones_like(ell), extras)


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(*p.bounds))


FAMILY = Family("cispo", CISPOParams, cispo, kernel, extra_metrics=("clipfrac", "clipfrac_upper"), log_probs=True)
