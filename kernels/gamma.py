"""γ selection on the device (SPEC §3): the statistics records of ℓ, their
fixed-order merge, the closed form of seed 002 and the exact sample-ESS rule.
No host sync anywhere; a NaN statistic gives a NaN γ (never a bound).

``gamma_rule`` (kernel argument) = (ρ_min, fixed_a, fixed_b, a_lo, a_hi, b_lo, b_hi):
group a is all tokens (or A>0 for the sign family), group b the A<0 tokens; a
fixed value ≥ 0 overrides the data-driven rule for its group (sign family), and
[lo, hi] is each group's γ interval (δ = γ− − 1 for group b).
"""
import triton
import triton.language as tl

from .common import batch_frame, clamp_nan, lane_summaries, max_nan, moments_init, moments_merge, unbiased_var
from .layout import S_AFIRST, S_ASUM, S_FRAME, S_GRID, S_LSUM, S_N_ALL, S_N_NEG, S_N_POS

GAMMA_FIXED = tl.constexpr(0)
GAMMA_ESS = tl.constexpr(1)
GAMMA_ESS_EXACT = tl.constexpr(2)
GAMMA_GIVEN = tl.constexpr(3)  # computed on the device before the loss pass (PSIS)
# the tokens a family's γ rule reads (``family.KernelFamily``: no rule, one γ from all tokens, γ± by sign)
GROUPS_NONE = tl.constexpr(0)
GROUPS_ALL = tl.constexpr(1)
GROUPS_SIGN = tl.constexpr(2)


@triton.jit
def gamma_closed_form(var, rho, lo, hi):
    """γ = clip(√(−ln ρ / σ²), lo, hi); σ² < 1e-8 → hi; NaN σ² → NaN."""
    g = tl.sqrt(-tl.log(rho) / tl.maximum(var, 1e-30))
    return tl.where(var < 1e-8, hi, clamp_nan(tl.where(var != var, var, g), lo, hi))


@triton.jit
def ess_grid_terms(ell, m, lo, hi, G: tl.constexpr):
    """Per-lane terms e^{γ_jℓ}, e^{2γ_jℓ}, ℓe^{γ_jℓ}, ℓe^{2γ_jℓ} ([BLOCK, G]) on the grid
    γ_j = lo + j·(hi−lo)/(G−1), zero where not m."""
    j = tl.arange(0, G).to(ell.dtype)
    gam = lo + (hi - lo) * (j / (G - 1))
    e = tl.where(m[:, None], tl.exp(ell[:, None] * gam[None, :]), 0.0)
    e2 = e * e
    le = tl.where(m[:, None], ell[:, None], 0.0)
    return e, e2, le * e, le * e2


@triton.jit
def solve_ess_exact(n, grid, rho, lo, hi, G: tl.constexpr):
    """Largest γ in [lo, hi] with ESS_γ/n ≥ ρ, ESS_γ = (Σw^γ)²/Σw^{2γ}, from the grid sums.

    f(γ) = 2·ln S1(γ) − ln S2(γ) − ln n is non-increasing (K = ln S1 is convex), so
    the grid brackets the root; inside the bracket a cubic Hermite interpolant of f
    (values and exact derivatives 2·D1/S1 − 2·D2/S2) is bisected. Empty → hi; NaN sums → NaN.
    """
    s1, s2, d1, d2 = grid
    j = tl.arange(0, G)
    h = (hi - lo) / (G - 1)
    nan = tl.sum(tl.where((s1 != s1) | (s2 != s2), 1.0, 0.0)) > 0.0
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
    g = tl.where(n >= 1.0, g, hi)
    return tl.where(nan, float("nan"), g)


@triton.jit
def record_index(j, first, base, stride):
    """Index of the j-th record of a merge: ``first`` for j = 0, then base + stride·j."""
    return tl.where(j == 0, first, base + stride * j)


@triton.jit
def _merge_groups(rec_ptr, count, first, base, stride, slots, PLAIN: tl.constexpr, KS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """[BLOCK] lanes of (count, mean, M2) of each group whose record slot is in ``slots`` (a
    tuple) over ``count`` records: each lane Chan-merges its records in order, or sums the frame
    sums (bit g of PLAIN; the maximum of max |ℓ|). One pass, fixed order, every group's loads
    issued together; ``common.lane_summaries`` merges the lanes."""
    jj = tl.arange(0, BLOCK)
    empty = moments_init(tl.zeros([BLOCK], rec_ptr.dtype.element_ty))
    lanes = ()
    for g in tl.static_range(len(slots)):
        lanes = lanes + (empty,)
    for j0 in range(0, count, BLOCK):
        j = j0 + jj
        rec = rec_ptr + record_index(j, first, base, stride).to(tl.int64) * KS
        ok = j < count
        merged = ()
        for g in tl.static_range(len(slots)):
            r = rec + slots[g]
            got = (tl.load(r, mask=ok, other=0.0), tl.load(r + 1, mask=ok, other=0.0),
                   tl.load(r + 2, mask=ok, other=0.0))
            if (PLAIN >> g) % 2 == 1:
                n, total, largest = lanes[g]
                merged = merged + ((n + got[0], total + got[1], max_nan(largest, got[2])),)
            else:
                merged = merged + (moments_merge(lanes[g], got),)
        lanes = merged
    return lanes


@triton.jit
def _merge_grid(rec_ptr, count, first, base, stride, slot, G: tl.constexpr,
                KS: tl.constexpr, BLOCK: tl.constexpr):
    """The four ESS grid sums ([G] each) starting at ``slot``, summed over the records
    (BLOCK // G records per step into [BLOCK // G, G] lane accumulators, one reduction at the end)."""
    r = tl.arange(0, BLOCK // G)[:, None]
    g = tl.arange(0, G)[None, :]
    dt = rec_ptr.dtype.element_ty
    s1 = tl.zeros([BLOCK // G, G], dt)
    s2 = tl.zeros([BLOCK // G, G], dt)
    d1 = tl.zeros([BLOCK // G, G], dt)
    d2 = tl.zeros([BLOCK // G, G], dt)
    for j0 in range(0, count, BLOCK // G):
        j = j0 + r
        ok = (j < count) & (g < G)
        rec = rec_ptr + record_index(j, first, base, stride).to(tl.int64) * KS + slot + g
        s1 += tl.load(rec, mask=ok, other=0.0)
        s2 += tl.load(rec + G, mask=ok, other=0.0)
        d1 += tl.load(rec + 2 * G, mask=ok, other=0.0)
        d2 += tl.load(rec + 3 * G, mask=ok, other=0.0)
    return tl.sum(s1, 0), tl.sum(s2, 0), tl.sum(d1, 0), tl.sum(d2, 0)


@triton.jit
def merge_sequence_sums(rec_ptr, count, first, base, stride, KS: tl.constexpr, BLOCK: tl.constexpr):
    """The row's sums (Σ m·z, Σ m·a, Σ m, A of the first counted token) from its piece records (in
    order; ``stats.py``): each lane keeps its first non-empty record, the earliest over the lanes
    wins."""
    jj = tl.arange(0, BLOCK)
    dt = rec_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dt)
    acc_a = tl.zeros([BLOCK], dt)
    acc_n = tl.zeros([BLOCK], dt)
    lane_first = tl.zeros([BLOCK], tl.int32) + count
    lane_a = tl.zeros([BLOCK], dt) + 1.0
    for j0 in range(0, count, BLOCK):
        j = j0 + jj
        rec = rec_ptr + record_index(j, first, base, stride).to(tl.int64) * KS
        acc += tl.load(rec + S_LSUM, mask=j < count, other=0.0)
        acc_a += tl.load(rec + S_ASUM, mask=j < count, other=0.0)
        n = tl.load(rec + S_N_ALL, mask=j < count, other=0.0)
        acc_n += n
        take = (n > 0.0) & (lane_first == count)
        lane_a = tl.where(take, tl.load(rec + S_AFIRST, mask=j < count, other=1.0), lane_a)
        lane_first = tl.where(take, j, lane_first)
    j_first = tl.min(lane_first)
    a_first = tl.sum(tl.where(lane_first == j_first, lane_a, 0.0))
    return tl.sum(acc), tl.sum(acc_a), tl.sum(acc_n), tl.where(j_first < count, a_first, 1.0)


@triton.jit
def family_context(rec_ptr, count, first, base, stride, gamma_rule, scratch_ptr,
                   GROUPS: tl.constexpr, GAMMA_MODE: tl.constexpr, HAS_STATS: tl.constexpr, FRAME: tl.constexpr,
                   KS: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr, W: tl.constexpr):
    """The family's γ context (c0, c1) from ``count`` statistics records (``record_index``),
    merged per warp through scratch_ptr (W > 0, see ``common.lane_summaries``) or CTA-wide (W = 0);
    (count, M2) of ℓ over the A>0 and A<0 groups (the sign family with statistics, else 0); and
    with FRAME (batch statistics) the frame (c, r, u) of pass 2's moments of ℓ from the records'
    frame sums (``common.batch_frame``), else 0.

    GROUPS_ALL (is_reshape's γ, is_reshape_var's γ_base): c0 = γ on [a_lo, a_hi] from σ² of all
    tokens, or the fixed value (validated in range). GROUPS_SIGN (is_reshape_sign): c0 = γ+ from
    the A>0 group (empty → 0.5), c1 = 1 + δ from the A<0 group (empty → 1.5); fixed values ≥ 0
    override. GROUPS_NONE: (0, 0).
    """
    rho, fixed_a, fixed_b, a_lo, a_hi, b_lo, b_hi = gamma_rule
    dt = rec_ptr.dtype.element_ty
    c0 = tl.zeros([], dt)
    c1 = tl.zeros([], dt)
    groups = (c0, c0, c0, c0)
    frame = (c0, c0, c0)
    if GROUPS == GROUPS_ALL:
        if GAMMA_MODE == GAMMA_FIXED:
            c0 += fixed_a  # validated in [a_lo, a_hi] on the host
        else:
            if FRAME:
                lanes = _merge_groups(rec_ptr, count, first, base, stride, (S_N_ALL, S_FRAME), 2, KS, BLOCK)
                summary, sums = lane_summaries(lanes, scratch_ptr, W, 2)
                f_n, f_total, f_largest = sums
                frame = batch_frame(f_n, f_total, f_largest)
            else:
                summary = lane_summaries(_merge_groups(rec_ptr, count, first, base, stride, (S_N_ALL,), 0, KS, BLOCK),
                                         scratch_ptr, W)[0]
            n, mean, m2 = summary  # (no nested unpacking: Triton < 3.7's dependency scan rejects it)
            if GAMMA_MODE == GAMMA_ESS:
                c0 += gamma_closed_form(unbiased_var(n, m2), rho, a_lo, a_hi)
            else:
                grid = _merge_grid(rec_ptr, count, first, base, stride, S_GRID, G, KS, BLOCK)
                c0 += solve_ess_exact(n, grid, rho, a_lo, a_hi, G)
    elif GROUPS == GROUPS_SIGN:
        if HAS_STATS:
            if FRAME:
                lanes = _merge_groups(rec_ptr, count, first, base, stride, (S_N_POS, S_N_NEG, S_FRAME), 4, KS, BLOCK)
                summary_p, summary_n, sums = lane_summaries(lanes, scratch_ptr, W, 4)
                f_n, f_total, f_largest = sums
                frame = batch_frame(f_n, f_total, f_largest)
            else:
                lanes = _merge_groups(rec_ptr, count, first, base, stride, (S_N_POS, S_N_NEG), 0, KS, BLOCK)
                summary_p, summary_n = lane_summaries(lanes, scratch_ptr, W)
            n_p, mean_p, m2_p = summary_p
            n_n, mean_n, m2_n = summary_n
            if GAMMA_MODE == GAMMA_ESS_EXACT:
                grid_a = _merge_grid(rec_ptr, count, first, base, stride, S_GRID, G, KS, BLOCK)
                grid_b = _merge_grid(rec_ptr, count, first, base, stride, S_GRID + 4 * G, G, KS, BLOCK)
                g_p = solve_ess_exact(n_p, grid_a, rho, a_lo, a_hi, G)
                d_n = solve_ess_exact(n_n, grid_b, rho, b_lo, b_hi, G)
            else:
                g_p = gamma_closed_form(unbiased_var(n_p, m2_p), rho, a_lo, a_hi)
                d_n = gamma_closed_form(unbiased_var(n_n, m2_n), rho, b_lo, b_hi)
            c0 += tl.where(fixed_a >= 0.0, fixed_a, tl.where(n_p > 0.0, g_p, 0.5))
            c1 += tl.where(fixed_b >= 0.0, fixed_b, tl.where(n_n > 0.0, 1.0 + d_n, 1.5))
            groups = (n_p, m2_p, n_n, m2_n)
        else:
            c0 += fixed_a
            c1 += fixed_b
    return (c0, c1), groups, frame
