"""Token selection: the k eligible tokens of smallest key, ties broken by position (the flat token
index: r·T + t padded, the packed index), for a family whose loss treats them apart (verl's
Clip-Cov and KL-Cov: ``families/clip_cov.py``, ``families/kl_cov.py``). A family selects when its
device module defines ``select(ell, w, A, lp, olp, (c0, c1), params, pos) -> (key, eligible)`` and its
``KernelFamily.select_ratio`` gives k = max(1, ⌊n·ratio⌋) of the n counted tokens (verl's
``int(n * ratio)``).

On the kernel path (``kernels/select.py``, planned in ``launch.py``) three launches and one stable
sort run before the loss pass, on the device, no host sync: the covariance's statistics, every
token's key (+inf where not eligible), the sort, and the k-th (key, position), which the loss pass
reads as its context (c0, c1, τ_key, τ_hi, τ_lo), the position as two fp32-exact parts
(τ_hi·2²⁴ + τ_lo). It recomputes each token's key with the same ``select`` and selects key < τ_key,
or key = τ_key at a position ≤ τ's: exactly the first k (every eligible token for fewer). This
module holds the references' side: plain torch, a rank instead of a threshold.

The covariance both families select on, over the counted tokens:

    Ā = mean A,  λ̄ = mean log π (detached),  cov_t = (A_t − Ā)·(log π_t − λ̄),

is NaN if one of them is not *good* (its log π − log π_old or advantage is not finite): then no
token is selected and every counted token's φ and F are NaN (SPEC §11; the families add 0·Ā).
"""
from __future__ import annotations

import torch


def _mean(x: torch.Tensor, good: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Σ x / n over the good tokens; their common value exactly when they are all equal (a
    constant A gives A − Ā = 0, not a rounding residue that would rank the tokens)."""
    if x.numel() == 0:
        return x.new_zeros(())
    lo = torch.where(good, x, float("inf")).min()
    hi = torch.where(good, x, -float("inf")).max()
    return torch.where(lo == hi, lo, torch.where(good, x, 0.0).sum() / n)


def covariance(lp: torch.Tensor, ell: torch.Tensor, adv: torch.Tensor, counted: torch.Tensor) -> tuple:
    """(cov, good, taint) over the ``counted`` tokens of the references' ℓ and A (NaN where not
    finite): good, the counted tokens with finite ℓ and A; cov NaN and taint (0-dim) NaN if a
    counted token is not good (SPEC §11: a statistic over a group holding a non-finite token),
    else taint 0."""
    good = counted & torch.isfinite(ell) & torch.isfinite(adv)
    n = counted.sum().clamp_min(1)
    taint = torch.where((counted & ~good).any(), float("nan"), 0.0).to(lp.dtype)
    a_mean = _mean(adv, good, n) + taint
    return (adv - a_mean) * (lp - (_mean(lp, good, n) + taint)), good, taint


def selection_count(n: torch.Tensor, ratio) -> torch.Tensor:
    """k = max(1, ⌊n·ratio⌋) (int64, 0-dim) of n counted tokens, computed in float64 as verl's
    ``int(n * ratio)``."""
    return torch.clamp(torch.floor(n.to(torch.float64) * ratio), min=1.0).to(torch.int64)


def first_by_position(keys: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The first k (device k) eligible ``keys`` of an [R, T] batch in ascending order, ties by
    position: exactly k of them (all, for fewer); the references' selection (a rank, no host
    sync). Row-major order is the kernels' token order at eligible tokens, the padded form of a
    packed batch included (its padding is never eligible), so a stable sort breaks the ties."""
    flat = torch.where(eligible, keys, float("inf")).reshape(-1)
    order = torch.sort(flat, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
    return (rank < k).reshape(keys.shape) & eligible
