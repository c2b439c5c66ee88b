"""Device helpers shared by every kernel: lane accumulators (moments, shifted
exponential sums) with their once-per-work-item reductions and merges, NaN-loud
clamps, and accurate special functions. Everything is interpreter-safe (no
libdevice, no asm).

Lane accumulators are tuples of [BLOCK] vectors updated element-wise inside a
tile loop (no block-level reduction there); ``moments_reduce`` folds the lanes into
scalars once per piece or program; ``moments_merge`` combines two summaries
element-wise (lanes of records); ``shift_moments*`` and ``expsum_scale`` re-base
summaries on a common mean / max, so that merging lanes is a sum. ``group_sum`` /
``group_max`` reduce each warp's lanes alone (shuffles, no CTA barrier).
"""
import triton
import triton.language as tl

from .compat import approx_div

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
    """num/den by ``fast_div``, and 0 where den == 0 (an empty denominator never gives NaN)."""
    return tl.where(den != 0.0, fast_div(num, tl.where(den != 0.0, den, 1.0)), 0.0)


@triton.jit
def fast_div(num, den):
    """num/den for the per-token paths: fp32 ``div.approx`` (≤ 2 ulp for |den| in [2⁻¹²⁶, 2¹²⁶],
    no IEEE fix-up sequence), IEEE division in fp64."""
    if num.dtype == tl.float32:
        q = approx_div(num, den)
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
def pooled_mean(n_l, mean_l, n, W: tl.constexpr):
    """Σ n_l·μ_l / n over lanes (per warp or all, as ``group_sum``; n = Σ n_l), as
    c + Σ n_l·(μ_l − c) / n with c the largest mean of a non-empty lane: exactly c when every
    mean is c (a constant ℓ keeps M2 = 0 exactly). NaN if a mean is."""
    c = group_max(tl.where(n_l > 0.0, mean_l, -INF), W)
    c = tl.where(c == -INF, 0.0, c)
    return c + group_sum(n_l * (mean_l - c), W) / tl.maximum(n, 1.0)


@triton.jit
def moments_reduce(acc, W: tl.constexpr):
    """Lanes → one (count, mean, M2) per warp, on its lanes (W > 0 warps: ``group_sum``), or of
    all lanes (W = 0): mean = ``pooled_mean``, M2 = Σ M2_l + n_l(μ_l − μ)²."""
    n_l, mean_l, m2_l = acc
    n = group_sum(n_l, W)
    mean = pooled_mean(n_l, mean_l, n, W)
    d = mean_l - mean
    return n, mean, group_sum(m2_l + n_l * d * d, W)


@triton.jit
def moments_merge(a, b):
    """Chan et al. merge of two (count, mean, M2) summaries; an empty side is neutral."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    frac = fast_div(n_b, tl.maximum(n, 1.0))
    delta = tl.where(n_b > 0.0, mean_b - mean_a, 0.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


@triton.jit
def exponent_of(x):
    """floor(log2 |x|) of each normal x as int32 (exact, from the bits); −B for 0 and subnormals,
    B + 1 for ±inf and NaN (B = 127 in fp32, 1023 in fp64)."""
    if x.dtype == tl.float64:
        return ((x.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1023
    else:
        return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def pow2(k, like):
    """2^k (int32 k) exactly in like's dtype, from the bits: 0 for k ≤ −B, 2^B for k ≥ B."""
    if like.dtype == tl.float64:
        return (tl.minimum(tl.maximum(k + 1023, 0), 2046).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    else:
        return (tl.minimum(tl.maximum(k + 127, 0), 254) << 23).to(tl.float32, bitcast=True)


@triton.jit
def moment_unit(n, m2):
    """k of the unit 2^k ≈ σ (σ² = M2/n, k = floor(log2 σ²)/2 rounded down) in which a
    summary's M3, M4 are held (M3/2^3k, M4/2^4k): so fp32 keeps them for tiny spreads
    (|ℓ − mean| ≈ 1e-12 has (ℓ − mean)⁴ ≈ 1e-48, below fp32). A function of (n, M2) alone,
    so a record needs no slot for it; an empty or constant summary has the smallest unit.
    No division: floor(log2 M2) − floor(log2 n) is within 1 of floor(log2 σ²)."""
    return (exponent_of(m2) - exponent_of(tl.maximum(n, 1.0)) + 2048) // 2 - 1024


@triton.jit
def unit_of(x):
    """2^floor(log2 |x|) of each normal x, exactly (x's exponent bits, one AND): 0 for 0 and
    subnormals, inf for ±inf and NaN."""
    if x.dtype == tl.float64:
        return (x.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
    else:
        return (x.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def inverse_unit(u):
    """1/u of a ``unit_of`` value u, exactly (one integer subtraction of the bits): 2^B for u = 0
    (B = 127 in fp32, 1023 in fp64), −inf for u = inf (a non-finite lane stays NaN)."""
    if u.dtype == tl.float64:
        return (0x7FE0000000000000 - u.to(tl.int64, bitcast=True)).to(tl.float64, bitcast=True)
    else:
        return (0x7F000000 - u.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def batch_frame(n, total, largest):
    """(c, r, u) of ℓ from the frame sums of all tokens (count n, Σℓ, max |ℓ|): c = Σℓ/n, and
    u = 2^(floor(log2(max|ℓ| + |c|)) − 22) and r = 1/u, exact powers of two. The frame of
    ``power_sums_add``: |ℓ − c|·r < 2^23 for every ℓ, so n·z⁴ < 2^123 stays finite in fp32,
    and a z below fp32's range is 2^−53 of the largest deviation (nothing to the moments)."""
    c = total / tl.maximum(n, 1.0)
    k = exponent_of(largest + tl.abs(c)) - 22
    return c, pow2(-k, c), pow2(k, c)


@triton.jit
def power_sums_init(like, FRAMED: tl.constexpr):
    """Empty lane accumulator of the moments of ℓ: FRAMED, (count, S1..S4) of z = (x − c)·r in a
    frame (c, r) given for the whole batch (``batch_frame``); else (count, K, v, S1..S4) of
    z = (x − K)/v, K the lane's first counted x and v = ``unit_of`` its largest |x − K| so far."""
    z = tl.zeros_like(like)
    if FRAMED:
        return z, z, z, z, z
    else:
        return z, z, z, z, z, z, z


@triton.jit
def power_sums_add(acc, x, m, frame, FRAMED: tl.constexpr):
    """S_p += z^p where m (four multiply-adds, no division). FRAMED: z = (x − c)·r in the batch
    frame (``batch_frame``: |z| < 2^23, so fp32 holds n·z⁴ for any spread). Else about the lane's
    first counted x K (a constant x gives exact zeros), in units v of the lane's largest |x − K|
    so far (|z| < 2: tiny log-ratios keep S4 within fp32); when v grows the sums are rescaled by
    f = v_old/v, a power of two (exact; ``inverse_unit``)."""
    if FRAMED:
        n, s1, s2, s3, s4 = acc
        c, r, u = frame
        z = tl.where(m, (x - c) * r, 0.0)
        z2 = z * z
        return n + tl.where(m, 1.0, 0.0), s1 + z, s2 + z2, s3 + z2 * z, s4 + z2 * z2
    else:
        n, K, v, s1, s2, s3, s4 = acc
        K = tl.where(m & (n == 0.0), x, K)
        d = tl.where(m, x - K, 0.0)
        v1 = tl.maximum(v, unit_of(d))
        r = inverse_unit(v1)
        f = v * r  # 1 unless v grew
        z = d * r
        f2 = f * f
        z2 = z * z
        return (n + tl.where(m, 1.0, 0.0), K, v1, s1 * f + z, s2 * f2 + z2, s3 * (f2 * f) + z2 * z,
                s4 * (f2 * f2) + z2 * z2)


@triton.jit
def central_sums(n, s1, s2, s3, s4):
    """(a, M2, M3, M4) of the power sums S_p = Σ z^p of n values: a = S1/n, M2 = S2 − a·S1 (≥ 0),
    M3 = S3 − 3a·S2 + 2a²·S1, M4 = S4 − 4a·S3 + 6a²·S2 − 3a³·S1."""
    a = s1 / tl.maximum(n, 1.0)
    m2 = s2 - a * s1
    return (a, tl.where(m2 < 0.0, 0.0, m2), s3 - 3.0 * a * s2 + 2.0 * (a * a) * s1,
            s4 - 4.0 * a * s3 + 6.0 * (a * a) * s2 - 3.0 * (a * a * a) * s1)


@triton.jit
def power_sums_moments(acc, FRAMED: tl.constexpr):
    """The lane's slots of a partial record (layout.P_N_ALL, P_M2): FRAMED, (count, S1, S2, S3,
    S4) as they are (records in one frame merge by sums); else (count, mean, M2, M3', M4') with
    M3', M4' in the units of ``moment_unit`` (count, M2) (records merge by ``shift_moments34``)."""
    if FRAMED:
        return acc
    else:
        n, K, v, s1, s2, s3, s4 = acc
        a, m2, m3, m4 = central_sums(n, s1, s2, s3, s4)
        M2 = (m2 * v) * v
        t = v * pow2(-moment_unit(n, M2), a)
        t3 = t * t * t
        return n, K + a * v, M2, m3 * t3, m4 * (t3 * t)


@triton.jit
def shift_moments34(n, mean, m2, m3, m4, mu, k):
    """M3, M4 of one summary (held in units 2^moment_unit(n, M2)) re-centred on mu (δ =
    mean − mu) and held in units 2^k (powers of 2: exact), all in those units:
    M3' = M3 + 3δM2 + nδ³, M4' = M4 + 4δM3 + 6δ²M2 + nδ⁴."""
    t = pow2(moment_unit(n, m2) - k, m2)
    r = pow2(-k, m2)
    d = tl.where(n > 0.0, mean - mu, 0.0) * r
    w2 = (m2 * r) * r
    t2 = t * t
    m3 = m3 * (t2 * t)
    d2 = d * d
    return m3 + 3.0 * d * w2 + n * d2 * d, m4 * (t2 * t2) + 4.0 * d * m3 + 6.0 * d2 * w2 + n * d2 * d2


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


# ----------------------------------------------------------------------------- warp groups
@triton.jit
def _warp_view(x, W: tl.constexpr):
    """[L] lanes as [L / 32W, W, 32]: lane l sits on thread l mod 32W (Triton's layout of a
    [L] vector, one lane per thread and repeat), so axis 1 is the warp and axis 2 its lanes."""
    L: tl.constexpr = x.shape[0]
    tl.static_assert(L % (32 * W) == 0, "group reductions need a multiple of 32 lanes per warp")
    return tl.reshape(x, (L // (32 * W), W, 32))


@triton.jit
def _on_lanes(s, x):
    """A [1, W, 1] per-warp value back on every lane of its warp, shaped like x."""
    L: tl.constexpr = x.shape[0]
    W: tl.constexpr = s.shape[1]
    return tl.reshape(tl.broadcast_to(s, (L // (32 * W), W, 32)), (L,))


@triton.jit
def group_sum(x, W: tl.constexpr):
    """Σ of each warp's lanes on every lane of the warp (W > 0 warps: a thread's lanes, then
    shuffles; no CTA barrier), or of all of x (W = 0: a scalar)."""
    if W == 0:
        return tl.sum(x)
    else:
        return _on_lanes(tl.sum(tl.sum(_warp_view(x, W), 0, keep_dims=True), 2, keep_dims=True), x)


@triton.jit
def group_max(x, W: tl.constexpr):
    """``group_sum`` for the NaN-propagating maximum."""
    if W == 0:
        return tl.reduce(x, 0, max_nan)
    else:
        v = _warp_view(x, W)
        return _on_lanes(tl.reduce(tl.reduce(v, 0, max_nan, keep_dims=True), 2, max_nan, keep_dims=True), x)


@triton.jit
def put(record, slot: tl.constexpr, values):
    """``record`` (a tuple) with the tuple ``values`` in its slots from ``slot`` on: how a record
    of a declared layout (``layout.py``) is written by field name."""
    return record[:slot] + values + record[slot + len(values):]


@triton.jit
def exchange_warps(values, scratch_ptr, W: tl.constexpr, USED: tl.constexpr):
    """Per-warp values (a tuple of [L] vectors, each on every lane of its warp) as [W] vectors
    that every thread reads: lane 0 of warp w writes value k at scratch_ptr + k·W + w, then one
    CTA barrier. Bit k of USED: value k is exchanged (the others come back 0). scratch_ptr:
    len(values)·W values of this program, free until the caller's next CTA barrier."""
    lane = tl.arange(0, values[0].shape[0])
    warp = lane // 32
    for k in tl.static_range(len(values)):
        if (tl.constexpr(USED) >> k) % 2 == 1:
            tl.store(scratch_ptr + k * W + warp, values[k], mask=(lane % 32 == 0) & (warp < W))
    tl.debug_barrier()  # the warps' values are visible to the whole CTA
    j = tl.arange(0, W)
    out = ()
    for k in tl.static_range(len(values)):
        if (tl.constexpr(USED) >> k) % 2 == 1:
            out = out + (tl.load(scratch_ptr + k * W + j),)
        else:
            out = out + (tl.zeros([W], values[k].dtype),)
    return out


@triton.jit
def _group_reduce(acc, W: tl.constexpr, PLAIN: tl.constexpr):
    """``moments_reduce`` of a (count, mean, M2) group, or (PLAIN) sums and a maximum of a frame
    accumulator (count, Σℓ, max |ℓ|)."""
    if PLAIN:
        n, total, largest = acc
        return group_sum(n, W), group_sum(total, W), group_max(largest, W)
    else:
        return moments_reduce(acc, W)


@triton.jit
def lane_summaries(groups, scratch_ptr, W: tl.constexpr, PLAIN: tl.constexpr = 0):
    """The (count, mean, M2) of the lane accumulators of each group (a tuple of up to three; bit
    g of PLAIN: group g is a frame accumulator, summed), per warp then across the W warps
    through scratch_ptr (3·W values per group, one ``exchange_warps``), or CTA-wide (W = 0)."""
    out = ()
    if W == 0:
        for g in tl.static_range(len(groups)):
            out = out + (_group_reduce(groups[g], 0, (PLAIN >> g) % 2 == 1),)
    else:
        per_warp = ()
        for g in tl.static_range(len(groups)):
            per_warp = per_warp + _group_reduce(groups[g], W, (PLAIN >> g) % 2 == 1)
        got = exchange_warps(per_warp, scratch_ptr, W, (1 << (3 * len(groups))) - 1)
        for g in tl.static_range(len(groups)):
            out = out + (_group_reduce((got[3 * g], got[3 * g + 1], got[3 * g + 2]), 0, (PLAIN >> g) % 2 == 1),)
    return out


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
