"""Pareto-smoothed importance sampling (PSIS) and the ``gamma="psis"`` rule (SPEC §3).

Device-agnostic PyTorch, float64 throughout, used by both the reference and
the fused op. Faithful to ``arviz.psislw`` (arviz 0.23, ``reff=1``), i.e.
Vehtari et al. (2024) with the Zhang & Stephens (2009) generalized-Pareto fit
and its weakly informative prior, vectorized over *segments* (the batch, or
one row each):

1. shift the log-weights by their max (x ≤ 0), sort them in descending order;
2. M = ceil(min(n/5, 3√n)); cutoff x_c = max(x_(M+1), log(tiny)) (the (M+1)-th
   largest value); the tail is {x > x_c} (at most M values, fewer with ties at
   the cutoff), L = its length;
3. L ≤ 4 → no fit: k̂ = +inf and no smoothing (arviz's behaviour; arviz raises
   for n < 2, here n < 2 simply gives k̂ = +inf and no smoothing);
4. else fit a GPD to exp(x_tail) − exp(x_c) (``_gpdfit``: m = 30 + ⌊√L⌋
   candidate b's, profile-likelihood weights, weights < 10·eps dropped,
   posterior mean b, k = mean log1p(−b·y), σ = −k/b, prior
   k̂ = (L·k + 5)/(L + 10));
5. if k̂ is finite, replace the tail by log(F⁻¹((i − ½)/L) + exp(x_c)),
   i = 1..L in ascending order (the expected order statistics), then cap every
   value at 0 (the largest raw log-weight);
6. normalize (logsumexp = 0).

Public API:

* :func:`psis_smooth` ``(log_w[n]) -> (smoothed normalized log_w[n], k_hat)`` — the
  arviz oracle's twin for one vector.
* :func:`psis_gamma` ``(ell[R,T], group[R,T], *, rho_min, lo, hi, fallback,
  per_row=False) -> (gamma, k_hat)`` — the largest γ ∈ [lo, hi] with
  ESS_γ/n ≥ ρ_min on the smoothed weights, ``fallback`` where k̂ > 0.7.

Host syncs: **none**. Every shape is derived from the *static* tensor shapes:
the tail is padded to the bound M(N) of a full segment of N = T (per row) or
R·T (batch) entries, and the n, M, L of each segment stay on the device as
masks. Non-group entries are pushed to the end by a descending
``torch.sort`` with −inf (no boolean-mask indexing).
"""
from __future__ import annotations

import math

import torch

__all__ = ["psis_smooth", "psis_gamma", "psis_tail_length", "K_HAT_THRESHOLD"]

F64 = torch.float64
K_HAT_THRESHOLD = 0.7  # k̂ above this: the smoothed estimate is unreliable → fallback γ
_EPS = torch.finfo(F64).eps
_CUTOFF_MIN = math.log(torch.finfo(F64).tiny)  # arviz: np.log(np.finfo(float).tiny)
_PRIOR_BS = 3.0  # Zhang & Stephens / arviz _gpdfit constants
_PRIOR_K = 10.0
_GAMMA_TOL = 1e-7


def psis_tail_length(n: int) -> int:
    """M = ceil(min(n/5, 3√n)) — the tail size PSIS fits (arviz, reff = 1)."""
    return int(math.ceil(min(n / 5.0, 3 * n ** 0.5))) if n > 0 else 0


def _psis_sorted(x: torch.Tensor, n: torch.Tensor):
    """PSIS on descending-sorted segments.

    ``x`` ``[S, N]`` float64, each row sorted in descending order, its first
    ``n[s]`` entries the segment's log-weights (finite), the rest −inf.
    Returns ``(y, k, fit)``: ``y`` ``[S, N]`` the smoothed log-weights shifted so
    that the raw max is 0 (not normalized; −inf beyond n, same order as ``x``),
    ``k`` ``[S]`` k̂ (+inf where not fitted), ``fit`` ``[S]`` bool (tail fitted).
    """
    S, N = x.shape
    dev = x.device
    if N == 0:
        return x.clone(), x.new_full((S,), math.inf), torch.zeros(S, dtype=torch.bool, device=dev)
    col = torch.arange(N, device=dev)
    valid = col[None, :] < n[:, None]
    top = torch.where(n > 0, x[:, 0], 0.0)
    x = torch.where(valid, x - top[:, None], -math.inf)  # raw max → 0 (arviz's x -= max_x)

    # cutoff: the (M+1)-th largest value (needs n ≥ 2 so that M < n)
    nf = n.to(F64)
    M = torch.ceil(torch.minimum(nf / 5.0, 3.0 * torch.sqrt(nf))).to(torch.long)
    Mb = max(psis_tail_length(N), 1)  # static bound on M (M is non-decreasing in n)
    x_cut = x.gather(1, M.clamp(0, N - 1)[:, None])[:, 0].clamp_min(_CUTOFF_MIN)
    xt = x[:, :Mb]
    in_tail = (xt > x_cut[:, None]) & valid[:, :Mb] & (n[:, None] >= 2)
    L = in_tail.sum(1)  # tail length
    fit = L > 4  # arviz: tail_len <= 4 → k = inf, no smoothing
    Lf = L.to(F64).clamp_min(1.0)

    # ---- _gpdfit on y = exp(x_tail) − exp(x_cut) (descending here, ascending in arviz)
    e_cut = torch.exp(x_cut)
    y = torch.where(in_tail, torch.exp(xt) - e_cut[:, None], 0.0)  # [S, Mb]
    y_max = torch.where(fit, y[:, 0], 1.0)
    q_asc = torch.floor(L.to(F64) / 4.0 + 0.5).to(torch.long) - 1  # arviz: ary[int(n/4 + 0.5) - 1]
    q_desc = (L - 1 - q_asc).clamp(0, Mb - 1)
    y_q = torch.where(fit, y.gather(1, q_desc[:, None])[:, 0], 1.0)
    m_est = 30 + torch.floor(torch.sqrt(L.to(F64))).to(torch.long)  # 30 + int(n**0.5)
    m_max = 30 + int(math.isqrt(Mb))
    j = torch.arange(1, m_max + 1, device=dev, dtype=F64)
    b_ok = (torch.arange(1, m_max + 1, device=dev)[None, :] <= m_est[:, None]) & fit[:, None]  # [S, m]
    b = (1.0 - torch.sqrt(m_est[:, None].to(F64) / (j[None, :] - 0.5))) / (_PRIOR_BS * y_q[:, None])
    b = b + 1.0 / y_max[:, None]
    b = torch.where(b_ok, b, 0.0)
    lg = torch.where(in_tail[:, None, :], torch.log1p(-b[:, :, None] * y[:, None, :]), 0.0)  # [S, m, Mb]
    k_b = lg.sum(2) / Lf[:, None]
    len_scale = Lf[:, None] * (torch.log(-(b / k_b)) - k_b - 1.0)
    len_scale = torch.where(b_ok, len_scale, -math.inf)
    # arviz: weights[a] = 1 / Σ_c exp(len_scale[c] − len_scale[a]) over the candidates c
    diff = torch.where(b_ok[:, None, :], len_scale[:, None, :] - len_scale[:, :, None], -math.inf)
    wts = 1.0 / torch.exp(diff).sum(2)
    wts = torch.where(b_ok & (wts >= 10 * _EPS), wts, 0.0)  # drop negligible weights
    b_post = (b * wts).sum(1) / wts.sum(1)
    b_post = torch.where(fit, b_post, 1.0)
    k_post = torch.where(in_tail, torch.log1p(-b_post[:, None] * y), 0.0).sum(1) / Lf
    sigma = -k_post / b_post
    k_hat = (Lf * k_post + _PRIOR_K * 0.5) / (Lf + _PRIOR_K)
    k_hat = torch.where(fit, k_hat, math.inf)

    # ---- smoothing: expected order statistics of the fitted GPD (_gpinv), then cap at 0
    smooth = fit & torch.isfinite(k_hat)
    kk = torch.where(smooth, k_hat, 1.0)[:, None]
    rank_asc = (L[:, None] - 1 - torch.arange(Mb, device=dev)[None, :]).to(F64)
    p = ((rank_asc + 0.5) / Lf[:, None]).clamp(0.0, 1.0)
    small_k = kk.abs() < _EPS
    g = torch.where(small_k, -torch.log1p(-p), torch.expm1(-kk * torch.log1p(-p)) / torch.where(small_k, 1.0, kk))
    g = torch.where(sigma[:, None] > 0, g * sigma[:, None], math.nan)  # _gpinv: σ ≤ 0 → nan
    tail_new = torch.log(g + e_cut[:, None])
    xt_new = torch.where(in_tail & smooth[:, None], tail_new, xt)
    x = torch.cat([xt_new, x[:, Mb:]], dim=1)
    x = torch.where(smooth[:, None] & (x > 0), 0.0, x)  # arviz: x[x > 0] = 0
    return x, k_hat, fit


def psis_smooth(log_w: torch.Tensor):
    """PSIS of a 1-D vector of (finite) log-weights, like ``arviz.psislw(log_w)``.

    Returns ``(smoothed_log_w, k_hat)``: float64 tensors on ``log_w``'s device,
    the smoothed log-weights in the input order and normalized
    (logsumexp = 0), and the 0-dim Pareto k̂. Where arviz cannot fit (tail of
    ≤ 4 samples, i.e. n ≤ 20, or ties at the cutoff) k̂ = +inf and the weights
    are only normalized; n < 2 (where arviz raises) behaves the same, n = 0
    gives an empty tensor and k̂ = +inf. No host sync.
    """
    if log_w.dim() != 1:
        raise ValueError(f"log_w must be 1-D, got shape {tuple(log_w.shape)}")
    lw = log_w.detach().to(F64)
    n = lw.shape[0]
    if n == 0:
        return lw.clone(), lw.new_full((), math.inf)
    s, idx = torch.sort(lw, descending=True, stable=True)
    y, k, _ = _psis_sorted(s[None, :], torch.full((1,), n, dtype=torch.long, device=lw.device))
    y = y[0] - torch.logsumexp(y[0], dim=0)
    return torch.empty_like(y).scatter_(0, idx, y), k[0]


def _ess_ratio_sorted(gamma: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, n: torch.Tensor):
    """(Σω)²/(n·Σω²) with ω = exp(γ(x − x_max)) per segment; x ≤ 0 with max at column 0."""
    z = torch.where(valid, gamma[:, None] * (x - x[:, :1]), -math.inf)
    om = torch.exp(z)
    s1, s2 = om.sum(1), (om * om).sum(1)
    return s1 * s1 / (n * s2).clamp_min(1e-300)


def psis_gamma(ell: torch.Tensor, group: torch.Tensor, *, rho_min: float, lo: float, hi: float,
               fallback: float, per_row: bool = False):
    """``gamma="psis"``: γ and k̂ of one group, for the batch or per row.

    ``ell`` ``[R, T]`` detached clamped log-ratios (any float dtype; values
    outside ``group`` are ignored, even if non-finite), ``group`` ``[R, T]`` bool.
    The group's log-weights ℓ are Pareto-smoothed (:func:`psis_smooth`'s
    algorithm) and γ is the largest value in [lo, hi] with
    ESS_γ/n ≥ ρ_min on the *smoothed* weights w̃ (ESS_γ = (Σw̃^γ)²/Σw̃^{2γ},
    non-increasing in γ; bisection to 1e-7 in float64): hi if hi passes, lo if
    lo fails. If k̂ > 0.7 → γ = ``fallback``.

    Edge cases: an empty group gives γ = hi, k̂ = 0 (the caller maps the
    sign-family empty values). A group whose tail has ≤ 4 samples (n ≤ 20,
    or ties at the cutoff; arviz gives k̂ = inf and no smoothing there) gives
    k̂ = 0 and γ from the exact ESS of the *unsmoothed* weights (= ``ess_exact``).
    A GPD fit that fails numerically (k̂ NaN, practically unreachable) counts as
    unreliable: k̂ = +inf → fallback.

    Returns ``(gamma, k_hat)`` float64 on ``ell``'s device: 0-dim with
    ``per_row=False``, ``[R]`` with ``per_row=True``. No host sync (shapes are
    static; see the module docstring).
    """
    if ell.dim() != 2 or group.shape != ell.shape:
        raise ValueError(f"ell and group must be [R, T] of the same shape, got "
                         f"{tuple(ell.shape)} and {tuple(group.shape)}")
    group = group.to(torch.bool)
    v = torch.where(group, ell.detach().to(F64), -math.inf)
    if not per_row:
        v, group = v.reshape(1, -1), group.reshape(1, -1)
    x, _ = torch.sort(v, dim=1, descending=True)
    n = group.sum(1)
    y, k, fit = _psis_sorted(x, n)
    k_hat = torch.where(fit, torch.where(torch.isnan(k), math.inf, k), 0.0)

    # bisection on the smoothed weights (unsmoothed where there was no fit)
    nf = n.to(F64)
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < n[:, None]
    S = x.shape[0]
    a = x.new_full((S,), float(lo))
    c = x.new_full((S,), float(hi))
    passes_hi = _ess_ratio_sorted(c, y, valid, nf) >= rho_min
    fails_lo = _ess_ratio_sorted(a, y, valid, nf) < rho_min
    iters = max(1, math.ceil(math.log2(max(hi - lo, _GAMMA_TOL) / _GAMMA_TOL)))
    for _ in range(iters):  # invariant: a passes, c fails
        mid = 0.5 * (a + c)
        ok = _ess_ratio_sorted(mid, y, valid, nf) >= rho_min
        a = torch.where(ok, mid, a)
        c = torch.where(ok, c, mid)
    gamma = torch.where(passes_hi, float(hi), torch.where(fails_lo, float(lo), a))
    gamma = torch.where(k_hat > K_HAT_THRESHOLD, float(fallback), gamma)
    gamma = torch.where(n > 0, gamma, float(hi))
    if not per_row:
        return gamma.reshape(()), k_hat.reshape(())
    return gamma, k_hat
