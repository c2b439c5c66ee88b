"""A family's token selection (``isreshape_triton/selection.py``): the k eligible tokens of
smallest key, ties by position, for the loss pass to treat apart (verl's Clip-Cov and KL-Cov).

Three launches before the loss pass, around one stable sort of the keys (torch):
``selection_sums_kernel`` (per program: counted and non-finite tokens, Σ, min and max of A and
log π over the good ones), ``selection_keys_kernel`` (every program merges those in a fixed order into the
context's (Ā, λ̄), then each token's key from the family's ``SELECT``, +inf where it is not
eligible) and ``selection_threshold_kernel`` (k = max(1, ⌊n·ratio⌋) in fp64, the k-th sorted key
and its position). Tokens are numbered as the loss pass numbers them (r·T + t padded, the
packed index); a token's values are those the loss pass reads, so it recomputes the same keys.
"""
import triton
import triton.language as tl

from .common import finite_or_nan
from .layout import POSITION_SPLIT

# per program: counted tokens, non-finite ones, then Σ, min and max of A and of log π over the good ones
SUM_FIELDS = tl.constexpr(8)


@triton.jit
def _token(ptr, s_r, s_t, offs, T, inb, other, FLAT: tl.constexpr):
    """A tile's raw values of one stream: at ptr + offs (FLAT: packed, or padded with rows
    back to back and token stride 1), else row offs // T, token offs % T."""
    if FLAT:
        addr = ptr + offs
    else:
        r = offs // T
        addr = ptr + r.to(tl.int64) * s_r + (offs - r * T).to(tl.int64) * s_t
    return tl.load(addr, mask=inb, other=other)


@triton.jit
def _load(lp_ptr, olp_ptr, adv_ptr, mask_ptr, s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r,
          s_mask_t, offs, N, T, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr, FLAT: tl.constexpr):
    """A tile's raw loads (lp, olp, A, mask), issued together."""
    inb = offs < N
    lp = _token(lp_ptr, s_lp_r, s_lp_t, offs, T, inb, 0.0, FLAT)
    olp = _token(olp_ptr, s_olp_r, s_olp_t, offs, T, inb, 0.0, FLAT)
    A = lp
    if HAS_ADV:
        A = _token(adv_ptr, s_adv_r, s_adv_t, offs, T, inb, 0.0, FLAT)
    m = inb
    if HAS_MASK:
        m = _token(mask_ptr, s_mask_r, s_mask_t, offs, T, inb, 0, FLAT)
    return lp, olp, A, m


@triton.jit
def _tile(raw, offs, N, clamp, ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr):
    """(ℓ, A, lp, olp, counted, good) of a tile's raw loads, as the loss pass reads them at counted
    tokens."""
    lp_v, olp_v, adv_v, mask_v = raw
    lp = lp_v.to(ACC)
    olp = olp_v.to(ACC)
    m = offs < N
    if HAS_MASK:
        m = m & (mask_v != 0)
    A = tl.where(m, 1.0, 0.0).to(ACC)
    if HAS_ADV:
        A = finite_or_nan(adv_v.to(ACC))
    d = finite_or_nan(lp - olp)
    good = m & (d == d) & (A == A)
    ell = tl.where(d < -clamp, -clamp, tl.where(d > clamp, clamp, d))
    return ell, A, lp, olp, m, good


@triton.jit(do_not_specialize=["N", "T", "s_lp_r", "s_lp_t", "s_olp_r", "s_olp_t", "s_adv_r", "s_adv_t",
                               "s_mask_r", "s_mask_t"])
def selection_sums_kernel(lp_ptr, olp_ptr, adv_ptr, mask_ptr, sums_ptr, N, T,
                          s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r, s_mask_t, clamp,
                          ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr, FLAT: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    """Program p's (counted tokens, non-finite ones, Σ / min / max of A, of log π over the good
    ones) at sums_ptr[p]: lane sums over its tiles p, p + P, ..., reduced once (the next tile's loads issued
    before a tile's arithmetic)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_T)
    step = tl.num_programs(0) * BLOCK_T
    n = tl.zeros([BLOCK_T], ACC)
    bad = n
    a_sum = n
    lp_sum = n
    a_min = n + float("inf")
    lp_min = a_min
    a_max = -a_min
    lp_max = a_max
    raw = _load(lp_ptr, olp_ptr, adv_ptr, mask_ptr, s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r,
                s_mask_t, pid * BLOCK_T + lanes, N, T, HAS_ADV, HAS_MASK, FLAT)
    for t0 in range(pid * BLOCK_T, N, step):
        ahead = _load(lp_ptr, olp_ptr, adv_ptr, mask_ptr, s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t,
                      s_mask_r, s_mask_t, t0 + step + lanes, N, T, HAS_ADV, HAS_MASK, FLAT)  # the next tile
        ell, A, lp, olp, m, good = _tile(raw, t0 + lanes, N, clamp, ACC, HAS_ADV, HAS_MASK)
        raw = ahead
        n += tl.where(m, 1.0, 0.0)
        bad += tl.where(m & ~good, 1.0, 0.0)
        a_sum += tl.where(good, A, 0.0)
        lp_sum += tl.where(good, lp, 0.0)
        a_min = tl.minimum(a_min, tl.where(good, A, float("inf")))
        a_max = tl.maximum(a_max, tl.where(good, A, -float("inf")))
        lp_min = tl.minimum(lp_min, tl.where(good, lp, float("inf")))
        lp_max = tl.maximum(lp_max, tl.where(good, lp, -float("inf")))
    out = sums_ptr + pid * SUM_FIELDS
    tl.store(out, tl.sum(n))
    tl.store(out + 1, tl.sum(bad))
    tl.store(out + 2, tl.sum(a_sum))
    tl.store(out + 3, tl.min(a_min))
    tl.store(out + 4, tl.max(a_max))
    tl.store(out + 5, tl.sum(lp_sum))
    tl.store(out + 6, tl.min(lp_min))
    tl.store(out + 7, tl.max(lp_max))


@triton.jit
def _field(sums_ptr, n_parts, field, other, BLOCK_P: tl.constexpr):
    """One field of every program's sums."""
    p = tl.arange(0, BLOCK_P)
    return tl.load(sums_ptr + p * SUM_FIELDS + field, mask=p < n_parts, other=other)


@triton.jit
def _mean(sums_ptr, n_parts, field, n, BLOCK_P: tl.constexpr):
    """Σ / n of the values summed at ``field`` (min, max after it), merged in a fixed order; their
    common value exactly when they are all equal (a constant A gives A − Ā = 0, no rounding)."""
    lo = tl.min(_field(sums_ptr, n_parts, field + 1, float("inf"), BLOCK_P))
    hi = tl.max(_field(sums_ptr, n_parts, field + 2, -float("inf"), BLOCK_P))
    return tl.where(lo == hi, lo, tl.sum(_field(sums_ptr, n_parts, field, 0.0, BLOCK_P)) / n)


@triton.jit(do_not_specialize=["N", "T", "n_parts", "s_lp_r", "s_lp_t", "s_olp_r", "s_olp_t", "s_adv_r",
                               "s_adv_t", "s_mask_r", "s_mask_t"])
def selection_keys_kernel(lp_ptr, olp_ptr, adv_ptr, mask_ptr, sums_ptr, n_parts, ctx_ptr, key_ptr, N, T,
                          s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r, s_mask_t, clamp, params,
                          SELECT: tl.constexpr, ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr,
                          FLAT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """(Ā, λ̄) = (Σ A, Σ log π) / max(n, 1) (exact for a constant), NaN with a non-finite token
    (SPEC §11), at ctx_ptr[0:2] (program 0); every token's key from ``SELECT`` at key_ptr, +inf
    where it is not counted or not eligible."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_T)
    n = tl.maximum(tl.sum(_field(sums_ptr, n_parts, 0, 0.0, BLOCK_P)), 1.0)
    nan = tl.where(tl.sum(_field(sums_ptr, n_parts, 1, 0.0, BLOCK_P)) > 0.0, float("nan"), 0.0)
    a_mean = _mean(sums_ptr, n_parts, 2, n, BLOCK_P) + nan
    lp_mean = _mean(sums_ptr, n_parts, 5, n, BLOCK_P) + nan
    if pid == 0:
        tl.store(ctx_ptr, a_mean)
        tl.store(ctx_ptr + 1, lp_mean)
    step = tl.num_programs(0) * BLOCK_T
    raw = _load(lp_ptr, olp_ptr, adv_ptr, mask_ptr, s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r,
                s_mask_t, pid * BLOCK_T + lanes, N, T, HAS_ADV, HAS_MASK, FLAT)
    for t0 in range(pid * BLOCK_T, N, step):
        offs = t0 + lanes
        ahead = _load(lp_ptr, olp_ptr, adv_ptr, mask_ptr, s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t,
                      s_mask_r, s_mask_t, offs + step, N, T, HAS_ADV, HAS_MASK, FLAT)  # the next tile
        ell, A, lp, olp, m, good = _tile(raw, offs, N, clamp, ACC, HAS_ADV, HAS_MASK)
        raw = ahead
        key, eligible = SELECT(ell, tl.exp(ell), A, lp, olp, (a_mean, lp_mean), params, offs.to(tl.int64))
        tl.store(key_ptr + offs, tl.where(m & eligible, key, float("inf")), mask=offs < N)


@triton.jit(do_not_specialize=["N", "n_parts"])
def selection_threshold_kernel(sums_ptr, n_parts, ratio, sorted_ptr, order_ptr, ctx_ptr, N,
                               BLOCK_P: tl.constexpr):
    """k = max(1, ⌊n·ratio⌋) of the n counted tokens, in fp64 as verl's ``int(n * ratio)`` (``ratio``:
    three fp32 parts of the double, ``launch.fp32_parts``); the k-th sorted key and its position
    (hi·2²⁴ + lo) at ctx_ptr[2:5] (the last token's for fewer; +inf for none)."""
    p = tl.arange(0, BLOCK_P)
    n = tl.sum(tl.load(sums_ptr + p * SUM_FIELDS, mask=p < n_parts, other=0.0).to(tl.int64))
    hi, mid, lo = ratio
    r = ((tl.zeros([], tl.float64) + hi) + mid) + lo
    k = tl.maximum(tl.floor(n.to(tl.float64) * r), 1.0).to(tl.int64)
    at = tl.minimum(k, N) - 1
    key = tl.load(sorted_ptr + at, mask=at >= 0, other=float("inf"))
    position = tl.load(order_ptr + at, mask=at >= 0, other=0).to(tl.int64)
    tl.store(ctx_ptr + 2, key)
    tl.store(ctx_ptr + 3, (position // POSITION_SPLIT).to(key.dtype))
    tl.store(ctx_ptr + 4, (position % POSITION_SPLIT).to(key.dtype))
