"""The rollout correction (``params.RolloutCorrection``) in plain PyTorch: the reference's, and
the token rejection of ``gamma="psis"``'s context on the kernel path (torch ops, no sync)."""
from __future__ import annotations

import math

import torch


def _weight(log_rho, correction, clamp):
    """(r, ρ): ρ = e^{clamp(log ρ)}, r its truncation, mask or 1 (NaN where log ρ is)."""
    lo, hi, _, _, _ = correction.floats
    rho = torch.exp(log_rho.clamp(-clamp, clamp))
    if correction.weight == "truncate":
        r = torch.where(rho > hi, hi, torch.where(rho < lo, lo, rho))
    elif correction.weight == "mask":
        r = torch.where((rho < lo) | (rho > hi), 0.0, rho)
    else:
        r = torch.where(torch.isnan(rho), math.nan, 1.0).to(rho.dtype)
    return r, rho


def _divergence(x, correction, clamp):
    """The rejection's token statistic of x clamped: k1 x, k2 ½x², k3 eˣ − 1 − x."""
    xc = x.clamp(-clamp, clamp)
    if correction.reject == "k1":
        return xc
    if correction.reject == "k2":
        return 0.5 * xc * xc
    return torch.exp(xc) - 1.0 - xc


def _keep(stat, correction):
    """The rejection's bounds hold (k1 two-sided on log bounds, else from above), or stat is NaN."""
    _, _, _, x_lo, x_hi = correction.floats
    if correction.reject is None:
        return torch.ones_like(stat, dtype=torch.bool)
    if correction.reject == "k1":
        return ~((stat < x_lo) | (stat > x_hi))
    return ~(stat > x_hi)


def log_ratio(log_prob, old_log_prob, rollout_log_prob, counted, correction, dt):
    """x per token, detached, in ``dt``: log π (``ratio_of="current"``) or log π_old minus
    log π_rollout at counted tokens (0 elsewhere), NaN where not finite."""
    base = log_prob if correction.ratio_of == "current" else old_log_prob
    x = torch.where(counted, base.detach().to(dt) - rollout_log_prob.detach().to(dt), 0.0)
    return torch.where(torch.isfinite(x), x, math.nan)


def token_keep(x, correction, clamp):
    """A token-level rejection's keep (every token at a sequence level, or without one)."""
    if correction.reject_level != "token":
        return torch.ones_like(x, dtype=torch.bool)
    return _keep(_divergence(x, correction, clamp), correction)


def rollout_terms(x, counted, correction, clamp) -> tuple:
    """(r, keep, ρ for the fraction metrics) of ``[R, T]`` log-ratios x (0 where not counted):
    per token, or per row (ρ_b = e^{clamp(Σ_t x_t)}; the rejection on the row's Σ, mean or max of
    the token statistic; a row's values broadcast over its tokens; ρ per row ``[R]``)."""
    if correction.level == "sequence":
        r, rho = _weight(x.sum(-1), correction, clamp)
        r = r[:, None].expand_as(x)
    else:
        r, rho = _weight(x, correction, clamp)
    keep = token_keep(x, correction, clamp)
    if correction.reject_level != "token":
        k = torch.where(counted, _divergence(x, correction, clamp), 0.0)
        n0 = counted.sum(-1).to(x.dtype)
        if correction.reject_level == "sequence_max":  # k2, k3 ≥ 0: 0 is an empty row's (as verl)
            stat = k.amax(-1) if k.shape[-1] else k.sum(-1)
            stat = torch.where(torch.isnan(k).any(-1), math.nan, stat)
        elif correction.reject_level == "sequence_mean":
            stat = torch.where(n0 > 0, k.sum(-1) / n0.clamp_min(1), 0.0)
        else:
            stat = k.sum(-1)
        keep = (_keep(stat, correction)[:, None] | torch.isnan(x)).expand_as(x)
    return r, keep, rho


def rollout_metrics(r, rho, x, counted, keep, correction, dt) -> dict:
    """The correction's metrics over the tokens the mask counts before its rejection (n₀): mean
    r, the fraction rejected and the mean of −x (``rollout_kl``); the fractions of ρ above the
    weight's upper bound and below its metric's lower bound (``RolloutCorrection.floats``) over
    those tokens, or over the rows for a sequence ratio (every row, as verl)."""
    _, hi, low, _, _ = correction.floats
    over = torch.ones_like(rho, dtype=torch.bool) if correction.level == "sequence" else counted

    def mean(v, over=counted):
        n = over.sum().to(torch.float64)
        total = torch.where(over, v.to(torch.float64), 0.0).sum()
        return torch.where(n > 0, total / n.clamp_min(1), 0.0).to(dt)

    return {"rollout_is_mean": mean(r), "rollout_is_fraction_high": mean(rho > hi, over),
            "rollout_is_fraction_low": mean(rho < low, over),
            "rollout_rs_masked_fraction": mean((~keep).to(dt)), "rollout_kl": -mean(x)}
