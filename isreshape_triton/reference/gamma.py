"""Batch statistics and γ selection (SPEC §3), written for clarity.

Everything here works on *detached* values in float64 (the statistics are
constants for the gradient), reduces over ``dims`` with ``keepdim=True`` so the
result broadcasts against ``[R, T]`` token tensors:

* ``dims=(0, 1)`` -> one value for the batch, shape ``[1, 1]``
* ``dims=(1,)``   -> one value per row,       shape ``[R, 1]``

A *group* is a boolean ``[R, T]`` tensor of the tokens that take part (the
counted tokens, or the counted tokens with A > 0, ...). Values outside the group
never influence the result.
Non-finite policy (SPEC §11): a NaN (or ±inf) value *in* a group makes that
group's variance and data-driven γ (every rule, also PSIS's k̂) NaN; other
groups (rows) are unaffected.
No ``.item()``, no boolean indexing: everything is masked reductions.
``gamma="psis"`` delegates to :func:`isreshape_triton.psis.psis_gamma` (sort-based,
also sync-free).
"""
from __future__ import annotations

import math

import torch

from ..psis import psis_gamma

SIGMA_SQ_FLOOR = 1e-8  # σ² below this → the rule's upper bound
ESS_EXACT_ITERS = 40  # bisection steps: (γ_max − γ_min)/2^40 ≪ 1e-7


def dims_for(granularity: str):
    """Reduction dims of a ``[R, T]`` tensor for ``gamma_granularity``."""
    return (0, 1) if granularity == "batch" else (1,)


def _keepdim_shape(x: torch.Tensor, dims):
    return [1 if i in dims else s for i, s in enumerate(x.shape)]


def masked_amax(x: torch.Tensor, group: torch.Tensor, dims, empty: float = 0.0) -> torch.Tensor:
    """max of ``x`` over the group (``empty`` where the group is empty)."""
    if x.numel() == 0:
        return x.new_full(_keepdim_shape(x, dims), empty)
    mx = torch.where(group, x, -math.inf).amax(dim=dims, keepdim=True)
    n = group.sum(dim=dims, keepdim=True)
    return torch.where(n > 0, mx, empty)


def masked_amin(x: torch.Tensor, group: torch.Tensor, dims, empty: float = 0.0) -> torch.Tensor:
    """min of ``x`` over the group (``empty`` where the group is empty)."""
    return -masked_amax(-x, group, dims, -empty)


def nonfinite_in(x: torch.Tensor, group: torch.Tensor, dims) -> torch.Tensor:
    """True (keepdim shape) where the group holds a non-finite value of ``x``."""
    return (group & ~torch.isfinite(x)).any(dim=dims, keepdim=True)


def masked_moments(x: torch.Tensor, group: torch.Tensor, dims):
    """(n, mean, unbiased variance) of ``x`` over the group, in float64.

    Shifted two-pass: mean first, then Σ(x − mean)² — accurate when
    |mean| ≫ std. A group of fewer than 2 tokens has variance 0, an empty group
    mean 0; a group holding a non-finite value has NaN variance (also when n < 2).
    """
    x = x.detach().to(torch.float64)
    n = group.to(torch.float64).sum(dim=dims, keepdim=True)
    mean = torch.where(group, x, 0.0).sum(dim=dims, keepdim=True) / n.clamp_min(1.0)
    dev = torch.where(group, x - mean, 0.0)
    var = (dev * dev).sum(dim=dims, keepdim=True) / (n - 1.0).clamp_min(1.0)
    var = torch.where(n >= 2, var, 0.0)
    return n, mean, torch.where(nonfinite_in(x, group, dims), math.nan, var)


def gamma_closed_form(sigma_sq: torch.Tensor, rho_min: float, gamma_min: float,
                      gamma_max: float) -> torch.Tensor:
    """``gamma="ess"``: clip(√(−ln ρ_min / σ²), γ_min, γ_max); σ² < 1e-8 → γ_max."""
    small = sigma_sq < SIGMA_SQ_FLOOR
    safe = torch.where(small, 1.0, sigma_sq)
    g = torch.sqrt(-math.log(rho_min) / safe)
    g = torch.where(small, gamma_max, g)
    return g.clamp(gamma_min, gamma_max)


def ess_ratio(gamma: torch.Tensor, ell: torch.Tensor, group: torch.Tensor, dims) -> torch.Tensor:
    """Sample ESS_γ / n = (Σ w^γ)² / (n · Σ w^{2γ}) over the group, float64.

    Computed with ω = exp(γℓ − max γℓ) (the ratio is scale free). Empty group → 1.
    """
    ell = ell.detach().to(torch.float64)
    gamma = gamma.to(torch.float64)
    n = group.to(torch.float64).sum(dim=dims, keepdim=True)
    z = gamma * ell
    zmax = masked_amax(z, group, dims)
    om = torch.where(group, torch.exp(z - zmax), 0.0)
    s1 = om.sum(dim=dims, keepdim=True)
    s2 = (om * om).sum(dim=dims, keepdim=True)
    ok = n > 0
    return torch.where(ok, s1 * s1 / torch.where(ok, s2 * n, 1.0), 1.0)


def gamma_ess_exact(ell: torch.Tensor, group: torch.Tensor, dims, rho_min: float,
                    gamma_min: float, gamma_max: float, iters: int = ESS_EXACT_ITERS) -> torch.Tensor:
    """``gamma="ess_exact"``: the largest γ ∈ [γ_min, γ_max] with ESS_γ/n ≥ ρ_min.

    ESS_γ/n is non-increasing in γ, so a fixed number of bisection steps in
    float64 finds it (vectorized over rows/groups, no host sync). If γ_max
    passes, γ_max; if γ_min already fails, γ_min. Empty groups are handled by
    the caller (they pass trivially here and give γ_max). A group holding a NaN ℓ
    gives NaN (never a bound: NaN fails every comparison of the bisection).
    """
    shape = _keepdim_shape(ell, dims)
    lo = ell.new_full(shape, gamma_min, dtype=torch.float64)
    hi = ell.new_full(shape, gamma_max, dtype=torch.float64)
    passes_hi = ess_ratio(hi, ell, group, dims) >= rho_min
    fails_lo = ess_ratio(lo, ell, group, dims) < rho_min
    for _ in range(iters):  # invariant: lo passes, hi fails
        mid = 0.5 * (lo + hi)
        ok = ess_ratio(mid, ell, group, dims) >= rho_min
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    g = torch.where(fails_lo, gamma_min, lo)
    g = torch.where(passes_hi, gamma_max, g)
    return torch.where(nonfinite_in(ell, group, dims), math.nan, g)


def select_gamma_k(rule, ell: torch.Tensor, group: torch.Tensor, dims, *, rho_min: float,
                   gamma_min: float, gamma_max: float, empty_value: float, fallback: float = 0.3):
    """(γ, k̂) for one group under ``rule``, both float64 of the keepdim shape.

    ``rule`` is "ess", "ess_exact", "psis" or a fixed float (used as given: the parameter
    validation refuses one outside [γ_min, γ_max]). For the data-driven rules an empty
    group gives ``empty_value`` and a group holding a NaN ℓ gives NaN (γ and k̂). k̂ is the
    PSIS Pareto k̂ with ``rule="psis"`` (0 for an empty group or one too small to
    fit, see :func:`isreshape_triton.psis.psis_gamma`; k̂ > 0.7 → γ = ``fallback``)
    and 0 for the other rules.
    """
    shape = _keepdim_shape(ell, dims)
    zero_k = ell.new_zeros(shape, dtype=torch.float64)
    if not isinstance(rule, str):
        return ell.new_full(shape, rule, dtype=torch.float64), zero_k
    n, _, var = masked_moments(ell, group, dims)
    tainted = nonfinite_in(ell, group, dims)
    ell = torch.where(torch.isfinite(ell), ell, 0.0)  # the tainted groups' results are replaced below
    k = zero_k
    if rule == "ess":
        g = gamma_closed_form(var, rho_min, gamma_min, gamma_max)
    elif rule == "ess_exact":
        g = gamma_ess_exact(ell, group, dims, rho_min, gamma_min, gamma_max)
    elif rule == "psis":
        if tuple(dims) not in ((0, 1), (1,)):  # pragma: no cover - internal use only
            raise ValueError(f"psis needs dims (0, 1) or (1,), got {dims!r}")
        g, k = psis_gamma(ell.detach(), group, rho_min=rho_min, lo=gamma_min, hi=gamma_max,
                          fallback=fallback, per_row=tuple(dims) == (1,))
        g, k = g.reshape(shape), k.reshape(shape)
    else:  # pragma: no cover - params validation rejects it earlier
        raise ValueError(f"gamma must be 'ess', 'ess_exact', 'psis' or a float, got {rule!r}")
    g, k = torch.where(n > 0, g, empty_value), torch.where(n > 0, k, 0.0)
    return torch.where(tainted, math.nan, g), torch.where(tainted, math.nan, k)


def select_gamma(rule, ell: torch.Tensor, group: torch.Tensor, dims, *, rho_min: float,
                 gamma_min: float, gamma_max: float, empty_value: float,
                 fallback: float = 0.3) -> torch.Tensor:
    """γ for one group under ``rule`` ("ess", "ess_exact", "psis" or a fixed float), float64.

    A fixed float is used as given (validated within [γ_min, γ_max]). For the data-driven
    rules an empty group gives ``empty_value``. See :func:`select_gamma_k` (which also
    returns the PSIS k̂).
    """
    return select_gamma_k(rule, ell, group, dims, rho_min=rho_min, gamma_min=gamma_min,
                          gamma_max=gamma_max, empty_value=empty_value, fallback=fallback)[0]


# is_reshape_sign (SPEC §4): γ+ ∈ [0.05, 0.99] (empty → 0.5); γ− = 1 + δ, δ ∈ [0.01, 0.99] (empty → 1.5)
SIGN_POS_BOUNDS = (0.05, 0.99, 0.5)
SIGN_NEG_DELTA_BOUNDS = (0.01, 0.99, 0.5)


def sign_gammas(ell: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, params, dims,
                return_k: bool = False):
    """(γ+, γ−) for ``is_reshape_sign``; float64, broadcastable to ``[R, T]``.

    γ+ from the A > 0 tokens: clip(√(−ln ρ/σ²₊), 0.05, 0.99), no tokens → 0.5;
    γ− from the A < 0 tokens: clip(1 + min(0.99, √(−ln ρ/σ²₋)), 1.01, 1.99)
    = 1 + clip(√(−ln ρ/σ²₋), 0.01, 0.99), no tokens → 1.5; σ² < 1e-8 → the
    upper bound. With ``gamma="ess_exact"`` the largest exponent (δ for γ−)
    whose sample ESS ratio is ≥ ρ; with ``gamma="psis"`` the same on the
    Pareto-smoothed weights of the group, and k̂ > 0.7 → γ+ = ``gamma_fallback``,
    δ = ``gamma_fallback``. Fixed ``gamma_pos``/``gamma_neg`` are used as given.

    ``return_k=True`` also returns the PSIS k̂ of both groups (k̂+, k̂−), same
    shapes (0 for a fixed exponent, an empty or too small group, or a non-PSIS rule).
    """
    shape = _keepdim_shape(ell, dims)
    fb = float(getattr(params, "gamma_fallback", 0.3))
    zero_k = ell.new_zeros(shape, dtype=torch.float64)
    if params.gamma_pos is not None:
        g_pos, k_pos = ell.new_full(shape, float(params.gamma_pos), dtype=torch.float64), zero_k
    else:
        lo, hi, empty = SIGN_POS_BOUNDS
        g_pos, k_pos = select_gamma_k(params.gamma, ell, mask & (adv > 0), dims, rho_min=params.rho_min,
                                      gamma_min=lo, gamma_max=hi, empty_value=empty, fallback=fb)
    if params.gamma_neg is not None:
        g_neg, k_neg = ell.new_full(shape, float(params.gamma_neg), dtype=torch.float64), zero_k
    else:
        lo, hi, empty = SIGN_NEG_DELTA_BOUNDS
        delta, k_neg = select_gamma_k(params.gamma, ell, mask & (adv < 0), dims, rho_min=params.rho_min,
                                      gamma_min=lo, gamma_max=hi, empty_value=empty, fallback=fb)
        g_neg = 1.0 + delta
    if return_k:
        return g_pos, g_neg, k_pos, k_neg
    return g_pos, g_neg
