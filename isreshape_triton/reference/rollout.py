"""The rollout correction (``params.RolloutCorrection``) in plain PyTorch: the reference's, and
the count mask of ``gamma="psis"``'s context on the kernel path (torch ops, no sync)."""
from __future__ import annotations

import math

import torch


def rollout_terms(base: torch.Tensor, rollout_lp: torch.Tensor, correction, clamp: float) -> tuple:
    """(r, keep, ρ) per token, detached, in ``base``'s dtype: x = clamp(base − log π_rollout, ±clamp)
    (NaN where not finite), ρ = eˣ; r = clamp(ρ, lo, hi) ("truncate"), ρ·[lo ≤ ρ ≤ hi] ("mask") or
    1 (NaN where x is); ``keep``: the rejection's bound holds (k1: lo ≤ ρ ≤ hi as log bounds of
    x; k2: ½x² ≤ hi; k3: eˣ − 1 − x ≤ hi), and where x is NaN (the token stays counted, poisoned)."""
    c = correction
    x = (base - rollout_lp).detach()
    x = torch.where(torch.isfinite(x), x, math.nan).clamp(-clamp, clamp)
    rho = torch.exp(x)
    lo, hi, _, x_lo, x_hi = c.floats
    if c.weight == "truncate":
        r = torch.where(rho > hi, hi, torch.where(rho < lo, lo, rho))
    elif c.weight == "mask":
        r = torch.where((rho < lo) | (rho > hi), 0.0, rho)
    else:
        r = torch.where(torch.isnan(x), math.nan, 1.0).to(x.dtype)
    if c.reject == "k1":
        keep = ~((x < x_lo) | (x > x_hi))
    elif c.reject == "k2":
        keep = ~(0.5 * x * x > x_hi)
    elif c.reject == "k3":
        keep = ~(rho - 1.0 - x > x_hi)
    else:
        keep = torch.ones_like(x, dtype=torch.bool)
    return r, keep, rho


def rollout_metrics(r, rho, mask0, keep, correction, dt) -> dict:
    """The correction's metrics over the tokens the mask counts before its rejection (n₀):
    mean r, the fractions with ρ above the weight's upper bound and below its metric's lower bound
    (``RolloutCorrection.floats``), and the fraction rejected."""
    _, hi, low, _, _ = correction.floats
    n0 = mask0.sum().to(torch.float64)

    def mean(v):
        total = torch.where(mask0, v.to(torch.float64), 0.0).sum()
        return torch.where(n0 > 0, total / n0.clamp_min(1), 0.0).to(dt)

    return {"rollout_is_mean": mean(r), "rollout_is_fraction_high": mean((rho > hi).to(dt)),
            "rollout_is_fraction_low": mean((rho < low).to(dt)), "rollout_rs_masked_fraction": mean((~keep).to(dt))}
