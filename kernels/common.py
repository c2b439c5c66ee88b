"""Device helpers shared by every kernel: tile loads, stable moments, accurate
special functions. Everything here is interpreter-safe (no libdevice, no asm)."""
import triton
import triton.language as tl


@triton.jit
def load_token_tile(lp_row, olp_row, adv_row, mask_row, offs, T,
                    s_lp, s_olp, s_adv, s_mask, clamp,
                    ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr):
    """ℓ = clamp(lp − olp, ±clamp), A (1 when advantages are None) and the count mask m.

    Masked positions are never read, so NaN/inf there cannot leak: ℓ = A = 0 and m = False.
    Inputs are upcast to ACC right after the load (bf16/fp16 arithmetic stays out).
    """
    offs64 = offs.to(tl.int64)
    m = offs < T
    if HAS_MASK:
        m = m & (tl.load(mask_row + offs64 * s_mask, mask=m, other=0) != 0)
    lp = tl.load(lp_row + offs64 * s_lp, mask=m, other=0.0).to(ACC)
    olp = tl.load(olp_row + offs64 * s_olp, mask=m, other=0.0).to(ACC)
    ell = tl.minimum(tl.maximum(lp - olp, -clamp), clamp)
    if HAS_ADV:
        adv = tl.load(adv_row + offs64 * s_adv, mask=m, other=0.0).to(ACC)
    else:
        adv = tl.where(m, 1.0, 0.0).to(ACC)
    return ell, adv, m


@triton.jit
def masked_moments(x, m):
    """(count, mean, M2) of x over m, two-pass inside the tile (no Σx² − (Σx)²/n)."""
    n = tl.sum(tl.where(m, 1.0, 0.0).to(x.dtype))
    mean = tl.sum(tl.where(m, x, 0.0)) / tl.maximum(n, 1.0)
    d = tl.where(m, x - mean, 0.0)
    return n, mean, tl.sum(d * d)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al. pairwise merge of (count, mean, M2); an empty side is neutral."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


@triton.jit
def merge_records(rec_ptr, nrec, slot, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                  HIGHER: tl.constexpr):
    """(count, mean, M2, M3, M4) of one group stored as (count, mean, M2[, M3, M4]) at ``slot``
    of ``nrec`` records of ``WIDTH`` values. Every record's central moments are shifted
    to the common mean (δ_r = μ_r − μ):  M2 = Σ M2_r + n_r·δ_r²,
    M3 = Σ M3_r + 3δ_r·M2_r + n_r·δ_r³,  M4 = Σ M4_r + 4δ_r·M3_r + 6δ_r²·M2_r + n_r·δ_r⁴.
    Vectorised, fixed order (deterministic). M3 = M4 = 0 unless HIGHER."""
    idx = tl.arange(0, BLOCK)
    dt = rec_ptr.dtype.element_ty
    acc_n = tl.zeros([BLOCK], dt)
    acc_s = tl.zeros([BLOCK], dt)
    for r0 in range(0, nrec, BLOCK):
        r = r0 + idx
        base = rec_ptr + r.to(tl.int64) * WIDTH + slot
        nr = tl.load(base, mask=r < nrec, other=0.0)
        acc_n += nr
        acc_s += nr * tl.load(base + 1, mask=r < nrec, other=0.0)
    n = tl.sum(acc_n)
    mean = tl.sum(acc_s) / tl.maximum(n, 1.0)
    acc2 = tl.zeros([BLOCK], dt)
    acc3 = tl.zeros([BLOCK], dt)
    acc4 = tl.zeros([BLOCK], dt)
    for r0 in range(0, nrec, BLOCK):
        r = r0 + idx
        base = rec_ptr + r.to(tl.int64) * WIDTH + slot
        nr = tl.load(base, mask=r < nrec, other=0.0)
        d = tl.where(nr > 0.0, tl.load(base + 1, mask=r < nrec, other=0.0) - mean, 0.0)
        m2 = tl.load(base + 2, mask=r < nrec, other=0.0)
        acc2 += m2 + nr * d * d
        if HIGHER:
            m3 = tl.load(base + 3, mask=r < nrec, other=0.0)
            acc3 += m3 + 3.0 * d * m2 + nr * d * d * d
            acc4 += tl.load(base + 4, mask=r < nrec, other=0.0) + 4.0 * d * m3 + 6.0 * d * d * m2 + nr * d * d * d * d
    return n, mean, tl.sum(acc2), tl.sum(acc3), tl.sum(acc4)


@triton.jit
def merge_moments(rec_ptr, nrec, slot, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """(count, unbiased σ²) of one group over ``nrec`` records (see ``merge_records``)."""
    n, mean, m2, m3, m4 = merge_records(rec_ptr, nrec, slot, WIDTH, BLOCK, False)
    return n, unbiased_var(n, m2)


@triton.jit
def masked_moments4(x, m):
    """(count, mean, M2, M3, M4) of x over m, central sums after an in-tile mean."""
    n = tl.sum(tl.where(m, 1.0, 0.0).to(x.dtype))
    mean = tl.sum(tl.where(m, x, 0.0)) / tl.maximum(n, 1.0)
    d = tl.where(m, x - mean, 0.0)
    d2 = d * d
    return n, mean, tl.sum(d2), tl.sum(d2 * d), tl.sum(d2 * d2)


@triton.jit
def merge4(n_a, mu_a, a2, a3, a4, n_b, mu_b, b2, b3, b4):
    """Merge two (count, mean, M2, M3, M4) summaries by shifting both to the joint mean."""
    n = n_a + n_b
    mu = (n_a * mu_a + n_b * mu_b) / tl.maximum(n, 1.0)
    da = tl.where(n_a > 0.0, mu_a - mu, 0.0)
    db = tl.where(n_b > 0.0, mu_b - mu, 0.0)
    m2 = a2 + n_a * da * da + b2 + n_b * db * db
    m3 = a3 + 3.0 * da * a2 + n_a * da * da * da + b3 + 3.0 * db * b2 + n_b * db * db * db
    m4 = (a4 + 4.0 * da * a3 + 6.0 * da * da * a2 + n_a * da * da * da * da
          + b4 + 4.0 * db * b3 + 6.0 * db * db * b2 + n_b * db * db * db * db)
    return n, mu, m2, m3, m4


@triton.jit
def store_moments(ptr, n, mean, m2):
    """Write a (count, mean, M2) summary to three consecutive slots."""
    tl.store(ptr, n)
    tl.store(ptr + 1, mean)
    tl.store(ptr + 2, m2)


@triton.jit
def unbiased_var(n, m2):
    """M2/(n−1); a group of fewer than 2 tokens has variance 0."""
    return tl.where(n >= 2.0, m2 / tl.maximum(n - 1.0, 1.0), 0.0)


@triton.jit
def safe_div(num, den):
    """num/den, and 0 where den == 0 (an empty denominator never gives NaN)."""
    return tl.where(den != 0.0, num / tl.where(den != 0.0, den, 1.0), 0.0)


@triton.jit
def expm1(x):
    """e^x − 1 accurate near 0: Kahan's (u−1)·x/log(u) for |x| < 1/2."""
    u = tl.exp(x)
    um1 = u - 1.0
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
    """expm1(g·x)/g, and its limit x at g = 0."""
    return tl.where(g == 0.0, x, expm1(g * x) / tl.where(g == 0.0, 1.0, g))


@triton.jit
def tanh(y):
    """tanh via expm1 of −2|y| (accurate near 0, no overflow)."""
    e = expm1(-2.0 * tl.abs(y))
    t = -e / (2.0 + e)
    return tl.where(y < 0.0, -t, t)


@triton.jit
def sech2_half(x):
    """sech²(x/2) = 4·σ(x)·σ(−x)."""
    return 4.0 * tl.sigmoid(x) * tl.sigmoid(-x)
