"""fp64 brute-force reference of ``irt.optimal_sampling`` (SPEC §9): the oracle of the kernels.

Straight from the formulas, vectorised over rows, no host sync:
π = softmax(logits / T), S = supp π_θ ∩ supp π_t, ℓ = log π_t − log π_θ,
q_α = softmax(α·log π_θ + (1−α)·log π_t) on S for α ∈ (0, 1), q_1 = π_θ, q_0 = π_t.

* kl_symmetry: E_S(α) = E_{q_α}[ℓ] on a dense grid of α, then bisection of the first sign change
  to 1e-15. No interior root: α = 1 if E_S(1) ≥ 0, α = 0 if E_S(0) ≤ 0 (``alpha_at_bound``).
* snr: SNR(α) = |Φ1|/√Φ2 with w = π_θ/q_α, r = log π_t − log π_ref, Φ1 = Σ(π_t − π_θ)·w·r,
  Φ2 = Var_{π_θ}[w·r], on a dense grid, then golden-section refinement around the grid maximum;
  the better of the refined point and the grid's best (an end point gives ``alpha_at_bound``).
  Rows whose supports differ (θ, t, and π_ref) fall back to kl_symmetry.
* The shared special cases, decided the same way as the kernels: E_S flat (ℓ constant on S, or
  E_S(0) − E_S(1) ≤ FLAT = 1e-12, below fp64 resolution) → the end point given by its sign (0.5
  within ±FLAT); identical distributions (equal supports and b − a constant on S up to
  IDENTICAL_SPREAD = 1e-5, where the root is 1/2 + O(spread), or E_S flat at 0) → 0.5; disjoint
  supports → α = 1; NaN/+inf logits or a row without a finite logit → NaN outputs and token −1.
* KL(q‖π) = Σ_{q>0} q·(log q − log π) (∞ where q has mass off supp π); the token is drawn by
  Gumbel-max with ``torch.rand`` noise from ``generator``.
"""
from __future__ import annotations

import math

import torch

from ..sampling_args import SamplingResult, validate

KL_GRID = 101
BISECTION_STEPS = 60
SNR_GRID = 1001
GOLDEN_STEPS = 80
IDENTICAL_SPREAD = 1e-5
FLAT = 1e-12
GRID_BLOCK = 32  # α points evaluated at once ([N, GRID_BLOCK, V] temporaries)


def _q_log(lpp: torch.Tensor, lpt: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log q_α for α [N, K]: [N, K, V] (S-restricted inside (0, 1), whole supports at 0 and 1)."""
    a = alpha.unsqueeze(-1)
    lpp, lpt = lpp.unsqueeze(1), lpt.unsqueeze(1)
    both = torch.isfinite(lpp) & torch.isfinite(lpt)
    s = torch.where(both, a * torch.where(both, lpp, 0.0) + (1 - a) * torch.where(both, lpt, 0.0), -math.inf)
    s = torch.where(a == 1.0, lpp, torch.where(a == 0.0, lpt, s))
    return torch.log_softmax(s, dim=-1)


def _e_s(lpp, lpt, alpha):
    """E_{q_α}[ℓ] with q_α restricted to S for every α (the continuous branch), [N, K]."""
    both = torch.isfinite(lpp) & torch.isfinite(lpt)
    ell = torch.where(both, lpt - lpp, 0.0).unsqueeze(1)
    a = alpha.unsqueeze(-1)
    s = torch.where(both.unsqueeze(1), a * torch.where(both, lpp, 0.0).unsqueeze(1)
                    + (1 - a) * torch.where(both, lpt, 0.0).unsqueeze(1), -math.inf)
    return (torch.softmax(s, dim=-1) * ell).sum(-1)


def _snr(lpp, lpt, lpr, alpha):
    """|Φ1|/√Φ2 at α [N, K] (rows with equal supports)."""
    lq = _q_log(lpp, lpt, alpha)
    both = (torch.isfinite(lpp) & torch.isfinite(lpt)).unsqueeze(1)
    pp, pt = lpp.exp().unsqueeze(1), lpt.exp().unsqueeze(1)
    w = torch.where(both, (lpp.unsqueeze(1) - lq).exp(), 0.0)
    r = torch.where(both, (lpt - lpr).unsqueeze(1), 0.0)
    phi1 = ((pt - pp) * w * r).sum(-1)
    phi2 = (pp * (w * r) ** 2).sum(-1) - (pp * w * r).sum(-1) ** 2
    return torch.where(phi2 > 0, phi1.abs() / phi2.clamp_min(1e-300).sqrt(), 0.0)


def _on_grid(fn, n_rows: int, points: int, device) -> torch.Tensor:
    grid = torch.linspace(0.0, 1.0, points, dtype=torch.float64, device=device)
    out = [fn(grid[i:i + GRID_BLOCK].expand(n_rows, -1)) for i in range(0, points, GRID_BLOCK)]
    return torch.cat(out, dim=1), grid


def _kl_root(lpp, lpt) -> torch.Tensor:
    """Root of E_S in [0, 1] for rows with E_S(0) > 0 > E_S(1) (other rows: any value)."""
    n = lpp.shape[0]
    e, grid = _on_grid(lambda a: _e_s(lpp, lpt, a), n, KL_GRID, lpp.device)
    k = (e <= 0).to(torch.int64).argmax(dim=1).clamp_min(1)
    lo, hi = grid[k - 1], grid[k]
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        pos = _e_s(lpp, lpt, mid.unsqueeze(1)).squeeze(1) > 0
        lo, hi = torch.where(pos, mid, lo), torch.where(pos, hi, mid)
    return 0.5 * (lo + hi)


def _snr_argmax(lpp, lpt, lpr) -> torch.Tensor:
    n = lpp.shape[0]
    snr, grid = _on_grid(lambda a: _snr(lpp, lpt, lpr, a), n, SNR_GRID, lpp.device)
    i = snr.argmax(dim=1)
    best_a, best_v = grid[i], snr.gather(1, i.unsqueeze(1)).squeeze(1)
    lo, hi = grid[(i - 1).clamp_min(0)], grid[(i + 1).clamp_max(SNR_GRID - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(GOLDEN_STEPS):
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
        f = _snr(lpp, lpt, lpr, torch.stack([c, d], dim=1))
        left = f[:, 0] >= f[:, 1]
        lo, hi = torch.where(left, lo, c), torch.where(left, d, hi)
    x = 0.5 * (lo + hi)
    fx = _snr(lpp, lpt, lpr, x.unsqueeze(1)).squeeze(1)
    return torch.where(fx > best_v, x, best_a)


def optimal_sampling(logits_policy, logits_target, method="kl_symmetry", temperature=1.0, ref_logits=None,
                     generator=None, return_log_q=False) -> SamplingResult:
    """Same signature and result as ``irt.optimal_sampling``; fp64 inside, fp32 outputs."""
    config = validate(logits_policy, logits_target, method, temperature, ref_logits, generator, return_log_q)
    lead, V = logits_policy.shape[:-1], logits_policy.shape[-1]
    T = config.temperature
    zp = logits_policy.reshape(-1, V).to(torch.float64) / T
    zt = logits_target.reshape(-1, V).to(torch.float64) / T
    lpp, lpt = torch.log_softmax(zp, -1), torch.log_softmax(zt, -1)
    n = lpp.shape[0]
    dev = lpp.device
    fp, ft = zp > -math.inf, zt > -math.inf
    both = fp & ft
    invalid = ((zp.isnan() | (zp == math.inf) | zt.isnan() | (zt == math.inf)).any(-1)
               | ~fp.any(-1) | ~ft.any(-1))
    lpr = lpp
    same_support = (fp == ft).all(-1)
    if ref_logits is not None:
        zr = ref_logits.reshape(-1, V).to(torch.float64) / T
        lpr = torch.log_softmax(zr, -1)
        invalid |= (zr.isnan() | (zr == math.inf)).any(-1) | ~(zr > -math.inf).any(-1)
        same_support &= ~(both & (zr == -math.inf)).any(-1)
    d = torch.where(both, zt - zp, 0.0)
    d_min = torch.where(both, d, math.inf).amin(-1)
    d_max = torch.where(both, d, -math.inf).amax(-1)
    disjoint = ~both.any(-1)
    ends = _e_s(lpp, lpt, torch.tensor([0.0, 1.0], dtype=torch.float64, device=dev).expand(n, 2))
    e0, e1 = ends[:, 0], ends[:, 1]
    flat = (d_min == d_max) | (e0 - e1 <= FLAT)
    e_flat = 0.5 * (e0 + e1)
    identical = ((d_max - d_min <= IDENTICAL_SPREAD) | (flat & (e_flat.abs() <= FLAT))) & same_support

    half = torch.full((n,), 0.5, dtype=torch.float64, device=dev)
    if config.method == "fixed":
        alpha = torch.full((n,), config.alpha, dtype=torch.float64, device=dev)
        bound = torch.zeros(n, dtype=torch.bool, device=dev)
        invalid |= disjoint & (alpha > 0) & (alpha < 1)
    else:
        alpha = torch.where(e1 >= 0, 1.0, torch.where(e0 <= 0, 0.0, _kl_root(lpp, lpt)))
        bound = (e1 >= 0) | (e0 <= 0)
        alpha = torch.where(flat, torch.where(e_flat > FLAT, 1.0, torch.where(e_flat < -FLAT, 0.0, 0.5)), alpha)
        bound = torch.where(flat, e_flat.abs() > FLAT, bound)
        alpha = torch.where(disjoint, 1.0, alpha)
        bound |= disjoint
        if config.method == "snr":
            snr_rows = same_support & ~identical
            best = _snr_argmax(lpp, lpt, lpr)
            alpha = torch.where(snr_rows, best, alpha)
            bound = torch.where(snr_rows, (best == 0) | (best == 1), bound)
        alpha = torch.where(identical, half, alpha)
        bound &= ~identical
    bound &= ~invalid
    alpha = torch.where(invalid, math.nan, alpha)

    lq = _q_log(lpp, lpt, alpha.unsqueeze(1)).squeeze(1)
    q = lq.exp()

    def kl(lp):
        return torch.where(q > 0, q * (lq - lp), 0.0).sum(-1)

    kl_p, kl_t = kl(lpp), kl(lpt)
    gen_device = generator.device if generator is not None else dev
    u = torch.rand((n, V), dtype=torch.float64, device=gen_device, generator=generator).to(dev)
    tokens = (lq - (-u.log()).log()).argmax(-1)
    drawn = ~invalid
    tokens = torch.where(drawn, tokens, -1)
    idx = tokens.clamp_min(0).unsqueeze(1)

    def at_token(x):
        return torch.where(drawn, x.gather(1, idx).squeeze(1), math.nan).to(torch.float32)

    nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
    result = SamplingResult(
        tokens=tokens.view(lead), alpha=alpha.to(torch.float32).view(lead), log_q=at_token(lq).view(lead),
        log_p_policy=at_token(lpp).view(lead), log_p_target=at_token(lpt).view(lead),
        kl_q_policy=torch.where(invalid, nan, kl_p).to(torch.float32).view(lead),
        kl_q_target=torch.where(invalid, nan, kl_t).to(torch.float32).view(lead),
        alpha_at_bound=bound.view(lead),
        log_q_full=(torch.where(invalid.unsqueeze(1), nan, lq).to(torch.float32).view(*lead, V)
                    if config.return_log_q else None))
    return result
