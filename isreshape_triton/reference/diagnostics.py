"""The metrics dict (SPEC §6, definitions in ``isreshape_triton/metrics.py``).

Masked reductions over the counted tokens in float64 on detached values, cast
to the output dtype (float32, float64 for float64 inputs). Empty batch: 0 for
every metric except the batch γ values (``gamma``, ``gamma_pos``,
``gamma_neg``, ``gamma_base`` with ``gamma_granularity="batch"``), which follow
their rule. Non-finite tokens (SPEC §11) carry a NaN ℓ, φ and extras, so every
metric over a set of counted tokens that holds one is NaN (emptiness tests are
written so that NaN falls through them); ``token_count`` and
``nonfinite_tokens`` stay finite.
"""
from __future__ import annotations

import math

import torch

from ..families import FAMILIES
from ..metrics import metric_names
from ..psis import K_HAT_THRESHOLD
from .gamma import masked_amax, masked_amin, masked_moments
from .shared import ALL, TokenTerms, ess, masked_mean, scalar

MOMENT_RESOLUTION = 1e-15  # numpy.finfo(float64).resolution, scipy's "m2 is 0" threshold


def _skew_kurt(x, mf, n):
    """Skewness m3/m2^1.5 and excess kurtosis m4/m2² − 3 with biased central moments
    (``scipy.stats.skew`` / ``scipy.stats.kurtosis`` defaults) over the counted tokens.

    0 when n = 0 or m2 = 0; as in scipy, m2 counts as 0 when it is below the
    rounding level of the mean, m2 ≤ (1e-15·mean)² (scipy returns NaN there)."""
    mean = (x * mf).sum() / n.clamp_min(1.0)
    d = (x - mean) * mf
    d2 = d * d
    m2 = d2.sum() / n.clamp_min(1.0)
    m3 = (d2 * d).sum() / n.clamp_min(1.0)
    m4 = (d2 * d2).sum() / n.clamp_min(1.0)
    zero = (n == 0) | (m2 <= (MOMENT_RESOLUTION * mean) ** 2) | (m2 == 0)  # False for NaN m2
    safe = torch.where(zero, 1.0, m2)
    return torch.where(zero, 0.0, m3 / safe ** 1.5), torch.where(zero, 0.0, m4 / (safe * safe) - 3.0)


def _max_weight_ratio(ell, mask):
    """max w / Σw over the counted tokens = 1 / Σ exp(ℓ − max ℓ); 0 if empty."""
    e = torch.where(mask, torch.exp(ell - masked_amax(ell, mask, ALL)), 0.0).sum()
    return torch.where(e == 0, 0.0, 1.0 / torch.where(e == 0, 1.0, e))


def compute_metrics(loss_type: str, ell: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    terms: TokenTerms, stats: dict, params, out_dtype, nonfinite=None) -> dict:
    """``{name: 0-dim tensor}`` with exactly ``metric_names(loss_type, params)``, in that order.

    ``stats`` holds the family's statistics and, with ``gamma="psis"``, ``psis_k``
    (every k̂ of the batch: rows and/or sign groups; 0 where none was fitted).
    ``nonfinite``: boolean ``[R, T]`` of the non-finite counted tokens (None: none)."""
    ell = ell.detach().to(torch.float64)
    mf = mask.to(torch.float64)
    n = mf.sum()
    w = torch.exp(ell)
    phi = terms.phi.detach().to(torch.float64)
    gamma_t = torch.broadcast_to(terms.gamma_t.detach().to(torch.float64), ell.shape)

    ess_all, ess_ratio = ess(gamma_t * ell, mask)
    skewness, kurtosis = _skew_kurt(ell, mf, n)

    m = {
        "token_count": n,
        "nonfinite_tokens": (n * 0 if nonfinite is None else nonfinite.to(torch.float64).sum()),
        "ppo_kl": masked_mean(-ell, mf, n),
        "w_mean": masked_mean(w, mf, n),
        "w_max": scalar(masked_amax(w, mask, ALL)),
        "phi_mean": masked_mean(phi, mf, n),
        "phi_abs_max": scalar(masked_amax(phi.abs(), mask, ALL)),
        "sigma_sq": scalar(masked_moments(ell, mask, ALL)[2]),
        "ess": ess_all,
        "ess_ratio": ess_ratio,
        "skewness": skewness,
        "kurtosis": kurtosis,
        # max w / Σw = 1 / Σ exp(ℓ − max ℓ) (overflow-free)
        "max_weight_ratio": _max_weight_ratio(ell, mask),
    }
    family = FAMILIES[loss_type]
    if family.gamma_stats:
        m["gamma_mean"] = masked_mean(gamma_t, mf, n)
        m["gamma_min"] = scalar(masked_amin(gamma_t, mask, ALL))
        m["gamma_max"] = scalar(masked_amax(gamma_t, mask, ALL))
    if family.reference_metrics is not None:
        m.update(family.reference_metrics(ell, adv, mask, terms._replace(gamma_t=gamma_t), stats, params))
    for key, value in terms.extras.items():  # per-token extras: their means
        m[key] = masked_mean(value.detach(), mf, n)

    if "psis_k" in stats:  # gamma="psis": every k̂ of the batch (rows / sign groups)
        k = stats["psis_k"].to(torch.float64)
        m["psis_k"] = k.amax() if k.numel() else k.new_zeros(())
        flag = (k > K_HAT_THRESHOLD).any().to(torch.float64)
        m["psis_unreliable"] = torch.where(k.isnan().any(), math.nan, flag)  # k̂ NaN: unknown

    names = metric_names(loss_type, params)
    assert set(m) == set(names), (sorted(m), names)
    return {k: m[k].to(out_dtype) for k in names}
