"""γ selection on the device (SPEC §3): merging statistics records, the closed
form of seed 002, and the exact sample-ESS rule. No host sync anywhere."""
import triton
import triton.language as tl

from .common import merge_moments
from .families import IS_RESHAPE, IS_RESHAPE_SIGN, IS_RESHAPE_VAR
from .layout import S_GRID, S_N_ALL, S_N_NEG, S_N_POS

GAMMA_FIXED = tl.constexpr(0)
GAMMA_ESS = tl.constexpr(1)
GAMMA_ESS_EXACT = tl.constexpr(2)
GAMMA_GIVEN = tl.constexpr(3)  # computed on the device before pass 2 (PSIS)


@triton.jit
def gamma_closed_form(var, rho, lo, hi):
    """γ = clip(√(−ln ρ / σ²), lo, hi); σ² < 1e-8 → hi."""
    g = tl.sqrt(-tl.log(rho) / tl.maximum(var, 1e-30))
    return tl.where(var < 1e-8, hi, tl.minimum(tl.maximum(g, lo), hi))


@triton.jit
def ess_grid_terms(ell, m, lo, hi, G: tl.constexpr):
    """Tile sums of e^{γ_jℓ}, e^{2γ_jℓ}, ℓe^{γ_jℓ}, ℓe^{2γ_jℓ} on the grid γ_j = lo + j·(hi−lo)/(G−1)."""
    j = tl.arange(0, G).to(ell.dtype)
    gam = lo + (hi - lo) * (j / (G - 1))
    e = tl.where(m[:, None], tl.exp(ell[:, None] * gam[None, :]), 0.0)
    e2 = e * e
    le = tl.where(m[:, None], ell[:, None], 0.0)
    return tl.sum(e, 0), tl.sum(e2, 0), tl.sum(le * e, 0), tl.sum(le * e2, 0)


@triton.jit
def solve_ess_exact(n, s1, s2, d1, d2, rho, lo, hi, G: tl.constexpr):
    """Largest γ in [lo, hi] with ESS_γ/n ≥ ρ, ESS_γ = (Σw^γ)²/Σw^{2γ}.

    f(γ) = 2·ln S1(γ) − ln S2(γ) − ln n is non-increasing (K = ln S1 is convex), so
    the grid brackets the root; inside the bracket a cubic Hermite interpolant of f
    (values and exact derivatives 2·D1/S1 − 2·D2/S2) is bisected. Empty → hi.
    """
    j = tl.arange(0, G)
    h = (hi - lo) / (G - 1)
    s1 = tl.where(s1 > 0.0, s1, 1.0)
    s2 = tl.where(s2 > 0.0, s2, 1.0)
    f = 2.0 * tl.log(s1) - tl.log(s2) - tl.log(tl.maximum(n, 1.0))
    df = (2.0 * d1 / s1 - 2.0 * d2 / s2) * h
    target = tl.log(rho)
    last_ok = tl.max(tl.where(f >= target, j, -1))
    jb = tl.minimum(tl.maximum(last_ok, 0), G - 2)
    fa = tl.sum(tl.where(j == jb, f, 0.0))
    fb = tl.sum(tl.where(j == jb + 1, f, 0.0))
    da = tl.sum(tl.where(j == jb, df, 0.0))
    db = tl.sum(tl.where(j == jb + 1, df, 0.0))
    t_lo = fa * 0.0
    t_hi = t_lo + 1.0
    for _ in tl.static_range(40):
        t = 0.5 * (t_lo + t_hi)
        t2 = t * t
        t3 = t2 * t
        p = (2 * t3 - 3 * t2 + 1) * fa + (t3 - 2 * t2 + t) * da + (3 * t2 - 2 * t3) * fb + (t3 - t2) * db
        up = p >= target
        t_lo = tl.where(up, t, t_lo)
        t_hi = tl.where(up, t_hi, t)
    g = lo + h * (jb + t_lo)
    g = tl.where(last_ok >= G - 1, hi, tl.where(last_ok < 0, lo, g))
    return tl.where(n >= 1.0, g, hi)


@triton.jit
def _merged_ess_gamma(rec_ptr, nrec, n, group, rho, lo, hi,
                      KS: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    """Sum the ESS grid of ``group`` (0 = a, 1 = b) over the records and solve for γ."""
    r = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, G)[None, :]
    dt = rec_ptr.dtype.element_ty
    s1 = tl.zeros([G], dt)
    s2 = tl.zeros([G], dt)
    d1 = tl.zeros([G], dt)
    d2 = tl.zeros([G], dt)
    for r0 in range(0, nrec, BLOCK):
        ok = (r0 + r < nrec) & (j < G)
        base = rec_ptr + (r0 + r).to(tl.int64) * KS + S_GRID + group * 4 * G + j
        s1 += tl.sum(tl.load(base, mask=ok, other=0.0), 0)
        s2 += tl.sum(tl.load(base + G, mask=ok, other=0.0), 0)
        d1 += tl.sum(tl.load(base + 2 * G, mask=ok, other=0.0), 0)
        d2 += tl.sum(tl.load(base + 3 * G, mask=ok, other=0.0), 0)
    return solve_ess_exact(n, s1, s2, d1, d2, rho, lo, hi, G)


@triton.jit
def family_context(rec_ptr, nrec, p0, p1, p2, ga_lo, ga_hi, gb_lo, gb_hi,
                   FAMILY: tl.constexpr, GAMMA_MODE: tl.constexpr, HAS_STATS: tl.constexpr,
                   KS: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    """The family's γ context (c0, c1) from ``nrec`` statistics records.

    p0 = ρ_min. is_reshape / is_reshape_var: c0 = γ (γ_base) on [ga_lo, ga_hi] from σ²
    of all tokens, or clip(p1) when fixed. is_reshape_sign: c0 = γ+ on [ga_lo, ga_hi] from
    the A>0 group (empty → 0.5), c1 = 1 + δ with δ on [gb_lo, gb_hi] from the A<0 group
    (empty → 1.5); p1 ≥ 0 / p2 ≥ 0 fix γ+ / γ−. Other families: (0, 0).
    """
    dt = rec_ptr.dtype.element_ty
    c0 = tl.zeros([], dt)
    c1 = tl.zeros([], dt)
    if FAMILY == IS_RESHAPE or FAMILY == IS_RESHAPE_VAR:
        if GAMMA_MODE == GAMMA_FIXED:
            c0 += tl.minimum(tl.maximum(p1, ga_lo), ga_hi)
        else:
            n, var = merge_moments(rec_ptr, nrec, S_N_ALL, KS, BLOCK)
            if GAMMA_MODE == GAMMA_ESS:
                c0 += gamma_closed_form(var, p0, ga_lo, ga_hi)
            else:
                c0 += _merged_ess_gamma(rec_ptr, nrec, n, 0, p0, ga_lo, ga_hi, KS, G, BLOCK)
    elif FAMILY == IS_RESHAPE_SIGN:
        if HAS_STATS:
            n_p, var_p = merge_moments(rec_ptr, nrec, S_N_POS, KS, BLOCK)
            n_n, var_n = merge_moments(rec_ptr, nrec, S_N_NEG, KS, BLOCK)
            if GAMMA_MODE == GAMMA_ESS_EXACT:
                g_p = _merged_ess_gamma(rec_ptr, nrec, n_p, 0, p0, ga_lo, ga_hi, KS, G, BLOCK)
                d_n = _merged_ess_gamma(rec_ptr, nrec, n_n, 1, p0, gb_lo, gb_hi, KS, G, BLOCK)
            else:
                g_p = gamma_closed_form(var_p, p0, ga_lo, ga_hi)
                d_n = gamma_closed_form(var_n, p0, gb_lo, gb_hi)
            c0 += tl.where(p1 >= 0.0, p1, tl.where(n_p > 0.0, g_p, 0.5))
            c1 += tl.where(p2 >= 0.0, p2, tl.where(n_n > 0.0, 1.0 + d_n, 1.5))
        else:
            c0 += p1
            c1 += p2
    return c0, c1
