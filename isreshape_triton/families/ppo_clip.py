"""ppo_clip: PPO's clipped surrogate with verl's dual clip (SPEC §4) and TRL's ``delta``.
loss = max(−A·w', −A·clip(w, 1−ε_low, 1+ε_high)) with w' = min(w, δ) (``delta``, the two-sided
clip of INTELLECT-2; w' = w without it); for A<0 with the dual clip, min(that, −A·c).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, const, ones_like


@dataclass(frozen=True)
class PPOClipParams(Options):
    """max(−A·min(w, δ), −A·clip(w, 1−ε_low, 1+ε_high)); dual clip −A·c for A<0."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0  # None disables the dual clip
    delta: Optional[float] = None  # TRL's delta: the unclipped ratio capped at δ (None: no cap)

    def __post_init__(self):
        set_real(self, "clip_ratio_low", lo=0.0, hi=1.0, hi_open=True)
        set_real(self, "clip_ratio_high", lo=0.0)
        set_real(self, "clip_ratio_c", optional=True, lo=1.0, lo_open=True)
        set_real(self, "delta", optional=True, lo=0.0, lo_open=True)


def clipped_branches(ratio, adv, p):
    """(w', −A·w', −A·clip(w, 1−ε_low, 1+ε_high)) for the ratio w, w' = min(w, δ) with ``p.delta``
    (δ a constant, so w' has no gradient above δ), else w' = w."""
    rd = ratio.detach()
    capped = ratio if p.delta is None else torch.where(rd <= p.delta, ratio, const(p.delta, ratio))
    return capped, -adv * capped, -adv * torch.clamp(ratio, 1.0 - p.clip_ratio_low, 1.0 + p.clip_ratio_high)


def dual_clipped(loss, adv, p):
    """The dual clip (``p.clip_ratio_c`` = c) for A < 0: (min(loss, −A·c), where it is active)."""
    if p.clip_ratio_c is None:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    bound = -adv * p.clip_ratio_c
    on = (adv < 0) & (loss.detach() > bound)
    return torch.where(on, bound, loss), on


def ppo_clip(ell, adv, *, params):
    """φ = A·w where the unclipped branch is the active one and w ≤ δ, else 0. Branches are
    picked with torch.where on detached values (ties go to the unclipped branch), so autograd
    gives exactly that φ. Extras: clipfrac, clipfrac_lower (the dual clip active), low_clipped
    (w' < 1−ε_low with A < 0) and high_clipped (w' > 1+ε_high with A > 0), TRL's clip ratios."""
    p = params
    w = torch.exp(ell)
    wd = w.detach()
    capped, unclipped, clipped = clipped_branches(w, adv, p)
    take_unclipped = unclipped.detach() >= clipped.detach()
    loss = torch.where(take_unclipped, unclipped, clipped)
    loss, dual = dual_clipped(loss, adv, p)
    phi = torch.where(take_unclipped & ~dual & (wd == capped.detach()), adv * wd, 0.0)
    cd = capped.detach()
    extras = {"clipfrac": (clipped.detach() > unclipped.detach()).to(ell.dtype),
              "clipfrac_lower": dual.to(ell.dtype),
              "low_clipped": ((cd < 1.0 - p.clip_ratio_low) & (adv < 0)).to(ell.dtype),
              "high_clipped": ((cd > 1.0 + p.clip_ratio_high) & (adv > 0)).to(ell.dtype)}
    return TokenTerms(phi, -loss, ones_like(ell), extras)


def kernel(p) -> KernelFamily:
    """OPT = dual clip + 2·delta."""
    dual, delta = p.clip_ratio_c is not None, p.delta is not None
    return KernelFamily(floats(p.clip_ratio_low, p.clip_ratio_high, p.clip_ratio_c if dual else 0.0,
                               p.delta if delta else 0.0), opt=int(dual) + 2 * int(delta))


FAMILY = Family("ppo_clip", PPOClipParams, ppo_clip, kernel,
                extra_metrics=("clipfrac", "clipfrac_lower", "low_clipped", "high_clipped"))
