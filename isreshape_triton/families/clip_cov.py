"""clip_cov: Clip-Cov (verl ``clip_cov``, "The Entropy Mechanism of RL for Reasoning LMs"). PPO's
clipped surrogate, max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)), whose loss and gradient are dropped
at up to k = max(1, ⌊n·clip_cov_ratio⌋) tokens drawn at random among the candidates: counted
tokens the clip leaves alone whose covariance cov_t = (A_t − Ā)·(log π_t − mean log π)
(``isreshape_triton/selection.py``) lies in (clip_cov_lb, clip_cov_ub).

The draw is a seeded hash of the token's position (r·T + t padded, the packed index): the
candidates of the k smallest 24-bit keys are dropped, ties to the first by position (verl:
``torch.randperm``), so a call is deterministic. The clip counts as
active where ℓ > log(1+ε_high) with A > 0 or ℓ < log(1−ε_low) with A < 0 (verl's w-comparison,
decided on ℓ so that the selection pass and the kernel agree bit for bit). Rollout IS weights
scale each token, as verl.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..selection import covariance, first_by_position, selection_count
from ..family import Family, KernelFamily, floats
from ..options import Options, fp32, set_real
from ..reference.shared import TokenTerms, ones_like

SEED_LIMIT = 1 << 24  # a seed is an exact fp32 integer: the kernels take it as a runtime float
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ClipCovParams(Options):
    """PPO's clip (ε_low, ε_high), the dropped fraction and covariance window, the draw's seed (verl's defaults)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    seed: int = 0  # in [0, 2**24)

    def __post_init__(self):
        set_real(self, "clip_ratio_low", lo=0.0, hi=1.0)
        set_real(self, "clip_ratio_high", lo=0.0)
        set_real(self, "clip_cov_ratio", lo=0.0, hi=1.0, lo_open=True)
        set_real(self, "clip_cov_lb")
        set_real(self, "clip_cov_ub")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be below clip_cov_ub, got {self.clip_cov_lb} and {self.clip_cov_ub}")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**24), got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def log_bounds(self) -> tuple:
        """(log(1−ε_low), log(1+ε_high)) rounded to fp32, as the kernels get them."""
        return tuple(fp32(math.log1p(v)) for v in (-float(self.clip_ratio_low), float(self.clip_ratio_high)))


def _mix(x):
    """A bijective 32-bit mix (xorshift-multiply) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _U32
    return x ^ (x >> 16)


def random_key(seed: int, position: torch.Tensor) -> torch.Tensor:
    """The 24-bit key of the token at each flat ``position`` (the kernels' numbering), a bijective
    mix of the position and the seed, then its top 24 bits (the kernel's ``random_key``)."""
    return _mix((position & _U32) ^ ((seed * 0x2C1B3C6D) & _U32)) >> 8


def candidates(ell, adv, cov, good, p) -> torch.Tensor:
    """Good tokens the clip leaves alone (decided on ℓ) with clip_cov_lb < cov < clip_cov_ub."""
    log_lo, log_hi = p.log_bounds
    clipped = ((adv > 0) & (ell > log_hi)) | ((adv < 0) & (ell < log_lo))
    return good & ~clipped & (cov > p.clip_cov_lb) & (cov < p.clip_cov_ub)


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None, *, lp, position):
    """``selected``: the min(k, #candidates) candidates of smallest key (first by position among
    equals), k = max(1, ⌊n·clip_cov_ratio⌋) of the n counted tokens, the key a hash of the token's
    ``position`` (the kernels' numbering); ``taint``: 0, or NaN with the covariance's means."""
    cov, good, taint = covariance(lp, ell, adv, mask)
    k = selection_count(mask.sum(), p.clip_cov_ratio)
    key = random_key(p.seed, position).to(ell.dtype)
    return {"selected": first_by_position(key, candidates(ell, adv, cov, good, p), k), "taint": taint}


def clip_cov(ell, adv, *, selected, taint, params, lp, olp):
    """F = −max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high))·(1 − s), φ = A·w·(1 − s) where the unclipped
    branch is active, else 0 (s: selected); both NaN where the covariance's means are (``taint``:
    0 or NaN). Extras: cov_selected (s, verl's ``pg_clipfrac``), clipfrac (the clipped branch is
    the larger loss)."""
    p = params
    w = torch.exp(ell)
    unclipped = -adv * w
    clipped = -adv * torch.clamp(w, 1.0 - p.clip_ratio_low, 1.0 + p.clip_ratio_high)
    take_unclipped = unclipped.detach() >= clipped.detach()
    kept = ~selected
    loss = torch.where(kept, torch.where(take_unclipped, unclipped, clipped), 0.0)
    phi = torch.where(take_unclipped & kept, adv * w.detach(), 0.0)
    extras = {"cov_selected": selected.to(ell.dtype), "clipfrac": (clipped.detach() > unclipped.detach()).to(ell.dtype)}
    return TokenTerms(phi + taint, taint * ell - loss, ones_like(ell), extras)


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(p.clip_ratio_low, p.clip_ratio_high, *p.log_bounds, p.clip_cov_lb, p.clip_cov_ub,
                               float(p.seed)), gamma_mode="given",
                        select_ratio=p.clip_cov_ratio)


FAMILY = Family("clip_cov", ClipCovParams, clip_cov, kernel, stats=stats, extra_metrics=("cov_selected", "clipfrac"),
                log_probs=True)
