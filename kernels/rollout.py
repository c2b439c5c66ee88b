"""The rollout correction (``params.RolloutCorrection``): the rollout stream holds log π_rollout
and the kernels make the rollout IS weight r and the rejection from it.

``CORRECTION`` (constexpr, ``RolloutCorrection.code``): bits 0-1 the weight (1 truncate, 2 mask,
3 none; 0: the stream holds r itself), bits 2-3 the rejection's statistic (k1, k2, k3), bit 4 the
ratio of π (else π_old), bit 5 the sequence ratio, bits 6-7 the rejection's level (token, row
sum, mean, max). ``corr`` (runtime): (w_lo, w_hi, the low bound of the fraction metric, x_lo,
x_hi). Token level: everything from the token's x. Row level (``per_row``): pass 1 writes one
record per piece (``layout.C_*``: n₀, Σx, Σ or max of the token statistic, indexed like the row
statistics, ``rows.py``), and pass 2 merges the row's records (``row_correction``).
"""
import triton
import triton.language as tl

from .common import clamp_nan, finite_or_nan, max_nan, safe_div
from .layout import C_KSTAT, C_N0, C_XSUM

WEIGHT_TRUNCATE = tl.constexpr(1)
WEIGHT_MASK = tl.constexpr(2)
REJECT_K1 = tl.constexpr(1)
REJECT_K2 = tl.constexpr(2)
LEVEL_MEAN = tl.constexpr(2)  # the rejection's row statistic (1: Σ, the default): the mean, the max
LEVEL_MAX = tl.constexpr(3)


@triton.constexpr_function
def weight_mode(CORRECTION):
    return CORRECTION % 4


@triton.constexpr_function
def reject_kind(CORRECTION):
    return (CORRECTION // 4) % 4


@triton.constexpr_function
def ratio_of_current(CORRECTION):
    return (CORRECTION // 16) % 2 == 1


@triton.constexpr_function
def sequence_weight(CORRECTION):
    return (CORRECTION // 32) % 2 == 1


@triton.constexpr_function
def reject_level(CORRECTION):
    return CORRECTION // 64


@triton.constexpr_function
def per_row(CORRECTION):
    """A row quantity: pass 1 writes the correction records."""
    return CORRECTION >= 32


@triton.jit
def log_ratio(log_p, olp, rollout_lp, CORRECTION: tl.constexpr):
    """x = log π − log π_rollout (bit 4) or log π_old − log π_rollout, NaN where not finite."""
    if ratio_of_current(CORRECTION):
        return finite_or_nan(log_p - rollout_lp)
    else:
        return finite_or_nan(olp - rollout_lp)


@triton.jit
def weight(log_rho, clamp, corr, CORRECTION: tl.constexpr):
    """(r, ρ) of a log-ratio: ρ = e^{clamp(log ρ)}; r = clamp(ρ, w_lo, w_hi) (truncate), ρ inside
    [w_lo, w_hi] else 0 (mask), or 1; NaN where log ρ is."""
    w_lo, w_hi, _, _, _ = corr
    rho = tl.exp(clamp_nan(log_rho, -clamp, clamp))
    if weight_mode(CORRECTION) == WEIGHT_TRUNCATE:
        r = clamp_nan(rho, w_lo, w_hi)
    elif weight_mode(CORRECTION) == WEIGHT_MASK:
        r = tl.where((rho < w_lo) | (rho > w_hi), 0.0, rho)
    else:
        r = tl.where(rho == rho, 1.0, float("nan"))
    return r, rho


@triton.jit
def divergence(x, clamp, CORRECTION: tl.constexpr):
    """The rejection's token statistic of x clamped to ±clamp: k1 the log-ratio itself, k2 ½x²,
    k3 eˣ − 1 − x."""
    xc = clamp_nan(x, -clamp, clamp)
    if reject_kind(CORRECTION) == REJECT_K1:
        return xc
    elif reject_kind(CORRECTION) == REJECT_K2:
        return 0.5 * xc * xc
    else:
        return tl.exp(xc) - 1.0 - xc


@triton.jit
def keep(stat, corr, CORRECTION: tl.constexpr):
    """The rejection keeps a token or row: k1 x_lo ≤ stat ≤ x_hi, else stat ≤ x_hi; and where stat
    is NaN (the token stays counted, poisoned: SPEC §11); every token without a rejection."""
    _, _, _, x_lo, x_hi = corr
    if reject_kind(CORRECTION) == 0:
        return (stat == stat) | (stat != stat)
    elif reject_kind(CORRECTION) == REJECT_K1:
        return ~((stat < x_lo) | (stat > x_hi))
    else:
        return ~(stat > x_hi)


@triton.jit
def token_correction(log_p, olp, rollout_lp, m0, row, clamp, corr, CORRECTION: tl.constexpr):
    """(r, keep, x, ρ) at a tile's tokens: the token's weight and rejection, or its row's
    (``row`` = (r_b, keep_b) of ``row_correction``); x the token's log-ratio (NaN where not
    finite: the token is non-finite), ρ its ratio (the fraction metrics' at token level)."""
    x = log_ratio(log_p, olp, rollout_lp, CORRECTION)
    r_b, keep_b = row
    if sequence_weight(CORRECTION):  # the row's weight; its ratio is counted per row
        r = tl.where(m0, r_b, 1.0)
        rho = tl.full(x.shape, 1.0, x.dtype)
    else:
        r, rho = weight(x, clamp, corr, CORRECTION)
    if reject_level(CORRECTION) == 0:
        kept = keep(divergence(x, clamp, CORRECTION), corr, CORRECTION)
    else:
        kept = (keep_b.to(tl.int32) != 0) | (x != x)  # a non-finite token stays counted, as at token level
        # (the scalar goes through int32: the interpreter's | does not broadcast a scalar i1)
    return r, kept, x, rho


@triton.jit
def corr_init(like):
    """A piece's lane sums for the row records: (n₀, Σx, Σ or max of the statistic)."""
    return like, like, like


@triton.jit
def corr_add(sums, x, m0, clamp, CORRECTION: tl.constexpr):
    """The lane sums plus a tile's tokens counted before the rejection (max for ``sequence_max``;
    the statistics k2, k3 are ≥ 0, so 0 is its neutral, as verl's empty row)."""
    n0, xs, ks = sums
    k = tl.where(m0, divergence(x, clamp, CORRECTION), 0.0)
    if reject_level(CORRECTION) == LEVEL_MAX:
        ks = max_nan(ks, k)
    else:
        ks += k
    return n0 + tl.where(m0, 1.0, 0.0), xs + tl.where(m0, x, 0.0), ks


@triton.jit
def store_corr_record(ptr, sums, CORRECTION: tl.constexpr):
    """A piece's record (its lanes reduced) at ptr."""
    n0, xs, ks = sums
    if reject_level(CORRECTION) == LEVEL_MAX:  # the sums in one reduction, the maximum in another
        n, x_total = tl.split(tl.sum(tl.join(n0, xs), axis=0))
        k = tl.reduce(ks, 0, max_nan)
    else:  # all three in one reduction
        nx, k0 = tl.split(tl.sum(tl.join(tl.join(n0, xs), tl.join(ks, tl.zeros_like(ks))), axis=0))
        n, x_total = tl.split(nx)
        k, _ = tl.split(k0)
    tl.store(ptr + C_N0, n)
    tl.store(ptr + C_XSUM, x_total)
    tl.store(ptr + C_KSTAT, k)


@triton.jit
def row_correction(corr_ptr, count, first, base, stride, clamp, corr,
                   CORRECTION: tl.constexpr, CW: tl.constexpr, BLOCK: tl.constexpr):
    """(r_b, keep_b, ρ_b) of a row from its ``count`` records (``gamma.record_index`` order):
    ρ_b = e^{clamp(Σx)}, its weight, and the rejection on Σ, mean (Σ/n₀, 0 for an empty row) or
    max of the token statistic."""
    jj = tl.arange(0, BLOCK)
    dt = corr_ptr.dtype.element_ty
    n0 = tl.zeros([BLOCK], dt)
    xs = tl.zeros([BLOCK], dt)
    ks = tl.zeros([BLOCK], dt)
    for j0 in range(0, count, BLOCK):
        j = j0 + jj
        rec = corr_ptr + tl.where(j == 0, first, base + stride * j).to(tl.int64) * CW
        n0 += tl.load(rec + C_N0, mask=j < count, other=0.0)
        xs += tl.load(rec + C_XSUM, mask=j < count, other=0.0)
        k = tl.load(rec + C_KSTAT, mask=j < count, other=0.0)
        if reject_level(CORRECTION) == LEVEL_MAX:
            ks = max_nan(ks, k)
        else:
            ks += k
    n0 = tl.sum(n0)
    if reject_level(CORRECTION) == LEVEL_MAX:
        stat = tl.reduce(ks, 0, max_nan)
    elif reject_level(CORRECTION) == LEVEL_MEAN:
        stat = safe_div(tl.sum(ks), n0)
    else:
        stat = tl.sum(ks)
    r_b, rho_b = weight(tl.sum(xs), clamp, corr, CORRECTION)
    return r_b, keep(stat, corr, CORRECTION), rho_b
