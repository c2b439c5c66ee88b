"""Device helpers shared by every kernel: lane accumulators (moments, shifted
exponential sums) with their once-per-work-item reductions and merges, NaN-loud
clamps, and accurate special functions. Everything is interpreter-safe (no
libdevice, no asm).

Lane accumulators are tuples of [BLOCK] vectors updated element-wise inside a
tile loop (no block-level reduction there); ``moments_reduce`` folds the lanes into
scalars once per piece or program; ``moments_merge`` combines two summaries
element-wise (lanes of records); ``shift_moments*`` and ``expsum_scale`` re-base
summaries on a common mean / max, so that merging lanes is a sum (``stack8``: many
sums in one reduction).
"""
import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))


@triton.jit
def finite_or_nan(x):
    """x where finite, NaN where x is ±inf or NaN (a non-finite input is never made plausible)."""
    return tl.where(tl.abs(x) < INF, x, float("nan"))


@triton.jit
def clamp_nan(x, lo, hi):
    """clip(x, lo, hi) that keeps NaN (tl.minimum/tl.maximum would drop it)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def max_nan(a, b):
    """max(a, b) that propagates NaN (one ``max.NaN`` instruction on sm_90)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def min_nan(a, b):
    """min(a, b) that propagates NaN."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def safe_div(num, den):
    """num/den, and 0 where den == 0 (an empty denominator never gives NaN)."""
    return tl.where(den != 0.0, num / tl.where(den != 0.0, den, 1.0), 0.0)


@triton.jit
def fast_div(num, den):
    """num/den for the per-token paths: fp32 ``div.approx`` (≤ 2 ulp for |den| in [2⁻¹²⁶, 2¹²⁶],
    no IEEE fix-up sequence), IEEE division in fp64."""
    if num.dtype == tl.float32:
        q = tl.math.fdiv(num, den, approx=True)
    else:
        q = num / den
    return q


@triton.jit
def fast_rcp(x):
    """1/x by ``fast_div`` (``div.approx`` in fp32: 0 for |x| = inf)."""
    return fast_div(tl.full(x.shape, 1.0, x.dtype), x)


@triton.jit
def unbiased_var(n, m2):
    """M2/(n−1); a group of fewer than 2 tokens has variance 0, NaN if its token is
    (its M2 is then NaN: 0·M2 keeps it, SPEC §11)."""
    return tl.where(n >= 2.0, m2 / tl.maximum(n - 1.0, 1.0), 0.0 * m2)


# ----------------------------------------------------------------------------- moments
@triton.jit
def moments_init(like):
    """Empty (count, mean, M2) lane accumulator shaped like ``like``."""
    z = tl.zeros_like(like)
    return z, z, z


@triton.jit
def moments_add(acc, x, m):
    """Welford update of each lane's (count, mean, M2) with x where m."""
    n, mean, m2 = acc
    n1 = n + tl.where(m, 1.0, 0.0)
    d = tl.where(m, x - mean, 0.0)
    mean = mean + fast_div(d, tl.maximum(n1, 1.0))
    return n1, mean, m2 + d * tl.where(m, x - mean, 0.0)


@triton.jit
def moments_reduce(acc):
    """Lanes → one (count, mean, M2): mean = Σn_l·μ_l/n, M2 = Σ M2_l + n_l(μ_l − μ)²."""
    n_l, mean_l, m2_l = acc
    n = tl.sum(n_l)
    mean = tl.sum(n_l * mean_l) / tl.maximum(n, 1.0)
    d = mean_l - mean
    return n, mean, tl.sum(m2_l + n_l * d * d)


@triton.jit
def moments_merge(a, b):
    """Chan et al. merge of two (count, mean, M2) summaries; an empty side is neutral."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = tl.where(n_b > 0.0, mean_b - mean_a, 0.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


@triton.jit
def moments4_init(like):
    """Empty (count, mean, M2, M3, M4) lane accumulator."""
    z = tl.zeros_like(like)
    return z, z, z, z, z


@triton.jit
def moments4_add(acc, x, m):
    """Terriberry's online update of each lane's central sums M2..M4 with x where m."""
    n, mean, m2, m3, m4 = acc
    n1 = n + 1.0
    delta = x - mean
    dn = fast_div(delta, n1)
    dn2 = dn * dn
    term = delta * dn * n
    new_m4 = m4 + term * dn2 * (n1 * n1 - 3.0 * n1 + 3.0) + 6.0 * dn2 * m2 - 4.0 * dn * m3
    new_m3 = m3 + term * dn * (n1 - 2.0) - 3.0 * dn * m2
    return (tl.where(m, n1, n), tl.where(m, mean + dn, mean), tl.where(m, m2 + term, m2),
            tl.where(m, new_m3, m3), tl.where(m, new_m4, m4))


@triton.jit
def shift_moments4(n, mean, m2, m3, m4, mu):
    """Central sums of one summary re-centred on mu (δ = mean − mu):
    M2' = M2 + nδ², M3' = M3 + 3δM2 + nδ³, M4' = M4 + 4δM3 + 6δ²M2 + nδ⁴."""
    d = tl.where(n > 0.0, mean - mu, 0.0)
    d2 = d * d
    return (m2 + n * d2, m3 + 3.0 * d * m2 + n * d2 * d,
            m4 + 4.0 * d * m3 + 6.0 * d2 * m2 + n * d2 * d2)


@triton.jit
def shift_moments(n, mean, m2, mu):
    """M2 of one (count, mean, M2) summary re-centred on mu: M2 + nδ²."""
    d = tl.where(n > 0.0, mean - mu, 0.0)
    return m2 + n * d * d


# ----------------------------------------------------------------------------- shifted exponential sums
@triton.jit
def expsum_init(like):
    """Empty (max z, Σe^{z−max}, Σe^{2(z−max)}) lane accumulator."""
    z = tl.zeros_like(like)
    return z - INF, z, z


@triton.jit
def expsum_add(acc, z, m):
    """Online-rescaled sums of ω = e^z and ω² where m (one exp per element: either the
    new element or the old running max is the larger, so one of the two factors is 1)."""
    zmax, s1, s2 = acc
    new = m & (z > zmax)
    e = tl.where(m, tl.exp(-tl.abs(z - zmax)), 0.0)
    s1 = tl.where(new, s1 * e + 1.0, s1 + e)
    s2 = tl.where(new, s2 * (e * e) + 1.0, s2 + e * e)
    return tl.where(new, z, zmax), s1, s2


@triton.jit
def expsum_scale(zmax, mx):
    """e^{zmax − mx}: the factor that re-bases a summary on a larger max mx; 0 for an empty
    summary (zmax = −inf)."""
    return tl.where(zmax == -INF, 0.0, tl.exp(zmax - tl.where(zmax == -INF, 0.0, mx)))


@triton.jit
def ess_of(acc):
    """ESS = (Σω)²/Σω² of a shifted sum (scale free); 0 when empty."""
    zmax, s1, s2 = acc
    return safe_div(s1 * s1, s2)


# ----------------------------------------------------------------------------- stacks
@triton.jit
def stack8(v):
    """The 8-tuple v of equal-shape tensors as one tensor [..., 2, 2, 2], element (a, b, c) =
    v[a + 2b + 4c] (``tl.join`` appends its axis, inside the thread: stacking is free, and one
    reduction of a stack shares the cross-warp exchanges among its 8 values)."""
    return tl.join(tl.join(tl.join(v[0], v[1]), tl.join(v[2], v[3])),
                   tl.join(tl.join(v[4], v[5]), tl.join(v[6], v[7])))


@triton.jit
def unstack8(x):
    """The 8-tuple of a stack (inverse of ``stack8``)."""
    lo, hi = tl.split(x)
    lo0, lo1 = tl.split(lo)
    hi0, hi1 = tl.split(hi)
    v0, v1 = tl.split(lo0)
    v2, v3 = tl.split(lo1)
    v4, v5 = tl.split(hi0)
    v6, v7 = tl.split(hi1)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def stack8_offsets():
    """Index a + 2b + 4c of each element of a [2, 2, 2] stack (to store it as 8 slots)."""
    i = tl.arange(0, 2)
    return i[:, None, None] + 2 * i[None, :, None] + 4 * i[None, None, :]


# ----------------------------------------------------------------------------- special functions
@triton.jit
def expm1(x):
    """e^x − 1 accurate near 0. For |x| < 1/2: in fp32 the degree-8 Taylor polynomial
    x·(1 + x/2·(1 + x/3·(… (1 + x/8)))) (the next term is < 9e-9 relative: below half an
    ulp; 8 FMAs instead of a log and a division), in fp64 Kahan's (u−1)·x/log(u)."""
    u = tl.exp(x)
    um1 = u - 1.0
    if x.dtype == tl.float32:
        p = 1.0 / 40320.0 * x + 1.0 / 5040.0
        p = p * x + 1.0 / 720.0
        p = p * x + 1.0 / 120.0
        p = p * x + 1.0 / 24.0
        p = p * x + 1.0 / 6.0
        p = p * x + 0.5
        small = x + (x * x) * p
    else:
        small = tl.where(um1 == 0.0, x, um1 * x / tl.log(tl.where(um1 == 0.0, 2.0, u)))
    return tl.where(tl.abs(x) < 0.5, small, um1)


@triton.jit
def log1p(x):
    """log(1 + x) accurate near 0: log(u)·x/(u−1) with u = 1 + x."""
    u = 1.0 + x
    um1 = u - 1.0
    small = tl.where(um1 == 0.0, x, tl.log(u) * x / tl.where(um1 == 0.0, 1.0, um1))
    return tl.where(tl.abs(x) < 0.5, small, tl.log(u))


@triton.jit
def expm1_over(x, g):
    """expm1(g·x)/g; x·(1 + g·x/2) where |g·x| < 1e-4 (relative error < 2e-9), so that
    g = 0 gives the limit x and a subnormal g never divides a flushed product."""
    gx = g * x
    small = tl.abs(gx) < 1e-4
    return tl.where(small, x * (1.0 + 0.5 * gx), fast_div(expm1(gx), tl.where(small, 1.0, g)))


@triton.jit
def tanh(y):
    """tanh via expm1 of −2|y| (accurate near 0, no overflow)."""
    e = expm1(-2.0 * tl.abs(y))
    t = fast_div(-e, 2.0 + e)
    return tl.where(y < 0.0, -t, t)


@triton.jit
def sigmoid(x):
    """σ(x) = 1/(1 + e^{−x}) through ``fast_div`` (``tl.sigmoid`` divides in IEEE fp32: a
    ~17-instruction sequence); 0 as x → −∞, NaN for NaN."""
    return fast_rcp(1.0 + tl.exp(-x))


@triton.jit
def sech2_half(x):
    """sech²(x/2) = 4·σ(x)·σ(−x) = 4e/(1 + e)² with e = e^{−|x|} (one exponential, no overflow)."""
    e = tl.exp(-tl.abs(x))
    r = fast_rcp(1.0 + e)
    return 4.0 * e * (r * r)
