"""The partial record of a program of the loss pass, and the last program's merge of
them in program order into the aggregated loss (SPEC §5), the metric vector
(SPEC §6) and the gradient scale; for the seq-* modes first finish the rows that
span chunks with a segmented scan over the chunks' head/tail elements (``rows.py``).

A record is a tuple in the slot order of ``layout.P_*``. ``reduce_record`` merges a
record of lane vectors (a program's lane accumulators, or every program's partial)
into one: each warp merges its own lanes with shuffles (``merge_record``: counts,
Σ count·mean and maxima first, then every summary re-centred on the common mean
(Chan) and re-based on the common max, and summed), writes its record to the
program's scratch row, and after one CTA barrier every thread merges the warps'
records in warp order. Slots a specialization never fills (``layout.partial_slots``)
are neither reduced, stored nor read.
"""
import triton
import triton.language as tl

from .common import (central_sums, ess_of, exchange_warps, expsum_scale, group_max, group_sum, moment_unit, put,
                     pooled_mean, pow2, safe_div, shift_moments, shift_moments34, unbiased_var)
from .layout import (ELEMENT_WIDTH, E_COUNT, E_FLAGS, E_KL, E_LOSS, E_ROW, M_ESS, M_ESS_NEG, M_ESS_POS, M_ESS_RATIO,
                     M_ESS_RATIO_NEG, M_ESS_RATIO_POS, M_EXTRAS, M_GAMMA, M_GAMMA_BASE, M_GAMMA_MAX, M_GAMMA_MEAN,
                     M_GAMMA_MIN, M_GAMMA_NEG, M_GAMMA_POS, M_KL_LOSS, M_KURTOSIS, M_MAX_WEIGHT_RATIO,
                     M_NONFINITE_TOKENS, M_PHI_ABS_MAX, M_PHI_MEAN, M_PPO_KL, M_ROLLOUT_IS_FRACTION_HIGH,
                     M_ROLLOUT_IS_FRACTION_LOW, M_ROLLOUT_IS_MEAN, M_ROLLOUT_KL, M_ROLLOUT_RS_MASKED_FRACTION,
                     M_SIGMA_SQ, M_SIGMA_SQ_NEG, M_SIGMA_SQ_POS, M_SKEWNESS, M_TOKEN_COUNT, M_W_MAX, M_W_MEAN,
                     PARTIAL_WIDTH, P_ESS, P_ESS_NEG, P_ESS_POS, P_EXTRAS, P_GAMMA, P_G_MAX, P_KL, P_LOSS, P_M2,
                     P_M2_NEG, P_M2_POS, P_MAXIMA, P_NEG_G_MIN, P_NONFINITE, P_N_ALL, P_N_NEG, P_N_POS, P_PHI,
                     P_PHI_MAX, P_ROLLOUT, P_ROWS, P_SEQ_KL, P_SEQ_LOSS, P_SUMS, P_W, P_W_MAX, P_Z_ALL, P_Z_NEG,
                     P_Z_POS, ROW_ENDS, ROW_STARTS)

TOKEN_MEAN = tl.constexpr(0)
TOKEN_SUM = tl.constexpr(1)
SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)
SEQ_MEAN_TOKEN_MEAN = tl.constexpr(3)
SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(4)


@triton.jit
def _count(v, default, dt: tl.constexpr, ON_DEVICE: tl.constexpr):
    """A count (SPEC §5). ON_DEVICE: ``v`` points to a 0-dim device tensor, read here (no host
    sync); whether it was given is known on the host (this constexpr), so its value is never a
    "not given" test: a bad value (NaN, negative, ±inf) gives NaN, loud like a non-finite token
    (SPEC §11), and the reference does the same. Else ``v`` is a host float, validated finite and
    >= 0 on the host, or −1 for "not given" (then ``default``, the local count)."""
    if ON_DEVICE:
        c = tl.load(v).to(dt)
        return tl.where((c >= 0.0) & (c < float("inf")), c, float("nan"))
    else:
        c = v + tl.zeros([], dt)
        return tl.where(c >= 0.0, c, default)


@triton.constexpr_function
def _filled(slot, SLOTS):
    """Whether the specialization fills ``slot`` (bit ``slot`` of the ``SLOTS`` mask), at compile time."""
    return (SLOTS >> slot) % 2 == 1


@triton.jit
def _nothing(x, W: tl.constexpr):
    """The 0 of a slot never filled: a lane vector (W > 0) or a scalar."""
    if W == 0:
        return tl.zeros([], x.dtype)
    else:
        return tl.zeros_like(x)


@triton.jit
def _sum_of(x, slot: tl.constexpr, SLOTS: tl.constexpr, W: tl.constexpr):
    """``group_sum`` of x, the lanes' value of ``slot`` (re-based on the merged mean / max where
    it is a summary); 0 where the slot is never filled."""
    if _filled(slot, SLOTS):
        return group_sum(x, W)
    else:
        return _nothing(x, W)


@triton.jit
def _sum(r, slot: tl.constexpr, SLOTS: tl.constexpr, W: tl.constexpr):
    return _sum_of(r[slot], slot, SLOTS, W)


@triton.jit
def _max(r, slot: tl.constexpr, SLOTS: tl.constexpr, W: tl.constexpr):
    if _filled(slot, SLOTS):
        return group_max(r[slot], W)
    else:
        return _nothing(r[slot], W)


@triton.jit
def _mean(r, slot: tl.constexpr, count, SLOTS: tl.constexpr, W: tl.constexpr):
    """The pooled mean of the (count, mean) pair at ``slot`` (``common.pooled_mean``)."""
    if _filled(slot, SLOTS):
        return pooled_mean(r[slot], r[slot + 1], count, W)
    else:
        return _nothing(r[slot], W)


@triton.jit
def merge_record(r, SLOTS: tl.constexpr, W: tl.constexpr, FRAMED: tl.constexpr):
    """The merge of a record of [L] vectors (``layout.PARTIAL_FIELDS``): per warp, on every lane
    of the warp (W > 0 warps), or of all lanes into scalars (W = 0). The "sum" and "max" fields
    by their rule (maxima propagate NaN), the "own" ones by name: counts and Σ count·mean first,
    then every summary re-centred on the common mean (Chan) and re-based on the common max, and
    summed; an empty summary is neutral. FRAMED: the moments of ℓ are power sums in one frame (sums)."""
    out = ()
    for k in tl.static_range(PARTIAL_WIDTH):
        if _filled(k, P_MAXIMA):
            out = out + (_max(r, k, SLOTS, W),)
        elif _filled(k, P_SUMS):
            out = out + (_sum(r, k, SLOTS, W),)
        else:  # an own field, merged below
            out = out + (r[k],)
    c_a = _sum(r, P_N_ALL, SLOTS, W)
    c_p = _sum(r, P_N_POS, SLOTS, W)
    c_n = _sum(r, P_N_NEG, SLOTS, W)
    if FRAMED:  # (count, S1, S2, S3, S4) of ℓ in the batch frame (``common.power_sums_moments``)
        mu_a = _sum(r, P_N_ALL + 1, SLOTS, W)
        m2 = _sum(r, P_M2, SLOTS, W)
        m3 = _sum(r, P_M2 + 1, SLOTS, W)
        m4 = _sum(r, P_M2 + 2, SLOTS, W)
    else:  # (count, mean, M2, M3, M4), M3 and M4 in the merged summary's unit (``common.moment_unit``)
        mu_a = _mean(r, P_N_ALL, c_a, SLOTS, W)
        m2 = _sum_of(shift_moments(r[P_N_ALL], r[P_N_ALL + 1], r[P_M2], mu_a), P_M2, SLOTS, W)
        m3, m4 = shift_moments34(r[P_N_ALL], r[P_N_ALL + 1], r[P_M2], r[P_M2 + 1], r[P_M2 + 2], mu_a,
                                 moment_unit(c_a, m2))
        m3 = _sum_of(m3, P_M2 + 1, SLOTS, W)
        m4 = _sum_of(m4, P_M2 + 2, SLOTS, W)
    mu_p = _mean(r, P_N_POS, c_p, SLOTS, W)
    mu_n = _mean(r, P_N_NEG, c_n, SLOTS, W)
    f_a = expsum_scale(r[P_Z_ALL], out[P_Z_ALL])
    f_p = expsum_scale(r[P_Z_POS], out[P_Z_POS])
    f_n = expsum_scale(r[P_Z_NEG], out[P_Z_NEG])
    m2_p = shift_moments(r[P_N_POS], r[P_N_POS + 1], r[P_M2_POS], mu_p)
    m2_n = shift_moments(r[P_N_NEG], r[P_N_NEG + 1], r[P_M2_NEG], mu_n)
    out = put(out, P_N_ALL, (c_a, mu_a))
    out = put(out, P_N_POS, (c_p, mu_p))
    out = put(out, P_N_NEG, (c_n, mu_n))
    out = put(out, P_M2, (m2, m3, m4))
    out = put(out, P_M2_POS, (_sum_of(m2_p, P_M2_POS, SLOTS, W),))
    out = put(out, P_M2_NEG, (_sum_of(m2_n, P_M2_NEG, SLOTS, W),))
    out = put(out, P_ESS, _expsums(r, P_ESS, f_a, SLOTS, W))
    out = put(out, P_ESS_POS, _expsums(r, P_ESS_POS, f_p, SLOTS, W))
    return put(out, P_ESS_NEG, _expsums(r, P_ESS_NEG, f_n, SLOTS, W))


@triton.jit
def _expsums(r, slot: tl.constexpr, f, SLOTS: tl.constexpr, W: tl.constexpr):
    """The shifted exp sums (Σe^{z−max}, Σe^{2(z−max)}) at ``slot``, re-based by f = e^{max − common max}."""
    return _sum_of(r[slot] * f, slot, SLOTS, W), _sum_of(r[slot + 1] * (f * f), slot + 1, SLOTS, W)


@triton.jit
def _neutral(slot: tl.constexpr):
    """What an absent record holds in ``slot``: −inf for the maxima, 0 elsewhere."""
    if _filled(slot, P_MAXIMA):
        return float("-inf")
    else:
        return 0.0


@triton.jit
def load_record(rows, ok, SLOTS: tl.constexpr):
    """Every filled slot k of the records at the pointers ``rows`` (+ k), L1 bypassed (written
    by other programs), absent where not ``ok``; slots never filled are 0."""
    out = ()
    for k in tl.static_range(PARTIAL_WIDTH):
        if _filled(k, SLOTS):
            out = out + (tl.load(rows + k, mask=ok, other=_neutral(k), cache_modifier=".cg"),)
        else:
            out = out + (tl.zeros(ok.shape, rows.dtype.element_ty),)
    return out


@triton.jit
def store_record(ptr, record, SLOTS: tl.constexpr):
    """The filled slots k of a (scalar) record at ptr + k."""
    for k in tl.static_range(PARTIAL_WIDTH):
        if _filled(k, SLOTS):
            tl.store(ptr + k, record[k])


@triton.jit
def reduce_record(record, scratch_ptr, SLOTS: tl.constexpr, W: tl.constexpr, FRAMED: tl.constexpr):
    """One merged record (scalars) of a record of [L] lane vectors, L a multiple of 32·W (see
    the module docstring); scratch_ptr: PARTIAL_WIDTH·W values (``exchange_warps``)."""
    return merge_record(exchange_warps(merge_record(record, SLOTS, W, FRAMED), scratch_ptr, W, SLOTS), SLOTS, 0,
                        FRAMED)


@triton.jit
def _seg_add(start_a, n_a, loss_a, kl_a, start_b, n_b, loss_b, kl_b):
    """Segmented sums: b restarts the running sums where its row starts."""
    return (start_a | start_b, tl.where(start_b, n_b, n_a + n_b), tl.where(start_b, loss_b, loss_a + loss_b),
            tl.where(start_b, kl_b, kl_a + kl_b))


@triton.jit
def _spanning_rows(element_ptr, n_elements, row_count_ptr, dt: tl.constexpr, BLOCK_E: tl.constexpr):
    """(Σ (row loss)/n_b, Σ (row KL)/n_b, rows with n_b > 0) over the rows that span chunks:
    a segmented scan over the head/tail elements in chunk order; writes n_b of those rows."""
    idx = tl.arange(0, BLOCK_E)
    carry_n = tl.zeros([], dt)
    carry_loss = tl.zeros([], dt)
    carry_kl = tl.zeros([], dt)
    seq_loss = tl.zeros([], dt)
    seq_kl = tl.zeros([], dt)
    rows = tl.zeros([], dt)
    for e0 in range(0, n_elements, BLOCK_E):
        e = e0 + idx
        ok = e < n_elements
        el = element_ptr + e.to(tl.int64) * ELEMENT_WIDTH
        n = tl.load(el + E_COUNT, mask=ok, other=0.0, cache_modifier=".cg")
        loss = tl.load(el + E_LOSS, mask=ok, other=0.0, cache_modifier=".cg")
        kl = tl.load(el + E_KL, mask=ok, other=0.0, cache_modifier=".cg")
        flags = tl.load(el + E_FLAGS, mask=ok, other=0.0, cache_modifier=".cg").to(tl.int32)
        starts = (flags & ROW_STARTS) != 0
        seen, n_run, loss_run, kl_run = tl.associative_scan((starts, n, loss, kl), 0, _seg_add)
        n_run = tl.where(seen, n_run, n_run + carry_n)
        loss_run = tl.where(seen, loss_run, loss_run + carry_loss)
        kl_run = tl.where(seen, kl_run, kl_run + carry_kl)
        ends = (flags & ROW_ENDS) != 0
        seq_loss += tl.sum(tl.where(ends, safe_div(loss_run, n_run), 0.0))
        seq_kl += tl.sum(tl.where(ends, safe_div(kl_run, n_run), 0.0))
        rows += tl.sum(tl.where(ends & (n_run > 0.0), 1.0, 0.0))
        row = tl.load(el + E_ROW, mask=ok & ends, other=0.0, cache_modifier=".cg").to(tl.int64)
        tl.store(row_count_ptr + row, n_run, mask=ok & ends)
        last = idx == BLOCK_E - 1
        carry_n = tl.sum(tl.where(last, n_run, 0.0))
        carry_loss = tl.sum(tl.where(last, loss_run, 0.0))
        carry_kl = tl.sum(tl.where(last, kl_run, 0.0))
    return seq_loss, seq_kl, rows


@triton.jit
def _packed_rows(cu_ptr, S, row_count_ptr, BLOCK: tl.constexpr):
    """max_s (cu[s+1] − cu[s]), the padded T of a packed batch; writes n_b = 0 for the empty
    rows (no piece ever holds them), so that every row's count is defined."""
    idx = tl.arange(0, BLOCK)
    longest = tl.zeros([BLOCK], tl.int32)
    for s0 in range(0, S, BLOCK):
        s = s0 + idx
        lo = tl.minimum(tl.maximum(tl.load(cu_ptr + s, mask=s < S, other=0), 0), 2147483647).to(tl.int32)
        hi = tl.minimum(tl.maximum(tl.load(cu_ptr + s + 1, mask=s < S, other=0), lo), 2147483647).to(tl.int32)
        longest = tl.maximum(longest, hi - lo)
        tl.store(row_count_ptr + s, tl.zeros([BLOCK], row_count_ptr.dtype.element_ty), mask=(s < S) & (hi <= lo))
    return tl.max(longest)


@triton.jit
def finalize(partial_ptr, partial_stride, n_part, element_ptr, n_elements, row_count_ptr, cu_ptr,
             loss_ptr, metrics_ptr, grad_scale_ptr, scratch_ptr, batch_ctx, groups, frame, S, T,
             dp_size, global_token_count, global_batch_size, loss_scale_factor,
             agg, SEQ_AGG: tl.constexpr, SEQ_GAMMA: tl.constexpr, PACKED: tl.constexpr,
             COUNTS_ON_DEVICE: tl.constexpr, GROUPS_GIVEN: tl.constexpr, FRAMED: tl.constexpr, SLOTS: tl.constexpr,
             ROW_FRACTIONS: tl.constexpr, WARPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """All n_part (≤ BLOCK_P) partial records (``partial_stride`` apart) merged in program
    order (``reduce_record``); the loss, metrics (``layout.METRIC_FIELDS``) and the
    gradient scale s of SPEC §2 (for seq-mean-token-mean the backward divides it by the
    row's n_b). COUNTS_ON_DEVICE: bit 0 global_token_count, bit 1 global_batch_size are 0-dim
    device tensors (a bad value gives NaN: ``_count``). Only the slots in SLOTS are read (``layout.partial_slots``); GROUPS_GIVEN:
    (count, M2) of the A>0 and A<0 groups are ``groups`` (the batch statistics), not slots;
    FRAMED: the moments of ℓ are power sums in the batch ``frame`` (c, r, u). ROW_FRACTIONS: the
    rollout ratio's fraction metrics count rows (a sequence ratio, over all S rows as verl)."""
    p = tl.arange(0, BLOCK_P)
    dt = partial_ptr.dtype.element_ty
    if SEQ_AGG:  # the rows that span chunks first, before the partials' registers are live
        span_loss, span_kl, span_rows = _spanning_rows(element_ptr, n_elements, row_count_ptr, dt, BLOCK_E)
        if PACKED:
            longest = _packed_rows(cu_ptr, S, row_count_ptr, BLOCK_E).to(dt)
        else:
            longest = T + tl.zeros([], dt)
    # every filled slot of every partial record (L1 bypassed: written by other programs), loaded
    # before any is used (one L2 round trip); absent programs are empty records (−inf maxima)
    rec = reduce_record(load_record(partial_ptr + p.to(tl.int64) * partial_stride, p < n_part, SLOTS),
                        scratch_ptr, SLOTS, WARPS, FRAMED)
    n_all, mean_all, n_pos, mean_pos, n_neg, mean_neg = rec[P_N_ALL:P_N_NEG + 2]
    w_max, phi_max, g_max, g_min = rec[P_W_MAX], rec[P_PHI_MAX], rec[P_G_MAX], -rec[P_NEG_G_MIN]
    m2_all, m3_all, m4_all = rec[P_M2:P_M2 + 3]
    m2_pos, m2_neg = rec[P_M2_POS], rec[P_M2_NEG]
    if GROUPS_GIVEN:
        n_pos, m2_pos, n_neg, m2_neg = groups
    s_loss, s_kl, s_w, s_phi, s_g = rec[P_LOSS], rec[P_KL], rec[P_W], rec[P_PHI], rec[P_GAMMA]
    x0, x1, x4 = rec[P_EXTRAS], rec[P_EXTRAS + 1], rec[P_EXTRAS + 4]  # the extras a per-row γ rule reads
    nonfinite = rec[P_NONFINITE]
    ess_all = (rec[P_Z_ALL], rec[P_ESS], rec[P_ESS + 1])
    ess_pos = (rec[P_Z_POS], rec[P_ESS_POS], rec[P_ESS_POS + 1])
    ess_neg = (rec[P_Z_NEG], rec[P_ESS_NEG], rec[P_ESS_NEG + 1])

    # aggregation (SPEC §5); an empty denominator gives 0
    one = tl.full([], 1.0, dt)
    # every mode is (Σ m·L, or for seq-mean-token-mean Σ_b (Σ_t m·L)/n_b) × scale; ``agg`` is a
    # runtime code (one specialization for the token modes, one for the seq-* modes)
    seq_loss = s_loss
    seq_kl = s_kl
    gbs = one
    if SEQ_AGG:
        seq_loss = span_loss + rec[P_SEQ_LOSS]
        seq_kl = span_kl + rec[P_SEQ_KL]
        n_rows = span_rows + rec[P_ROWS]
        gbs = _count(global_batch_size, n_rows, dt, COUNTS_ON_DEVICE // 2 == 1)
    if not SEQ_AGG:
        scale = one  # token-sum
        if agg == TOKEN_MEAN:
            scale = safe_div(one, _count(global_token_count, n_all, dt, COUNTS_ON_DEVICE % 2 == 1))
    elif agg == SEQ_MEAN_TOKEN_SUM_NORM:
        scale = safe_div(one, gbs * tl.where(loss_scale_factor >= 0.0, loss_scale_factor, longest))
    else:  # seq-mean-token-sum, seq-mean-token-mean
        scale = safe_div(one, gbs)
    per_row_mean = agg == SEQ_MEAN_TOKEN_MEAN
    loss = tl.where(per_row_mean, seq_loss, s_loss) * scale
    kl_loss = tl.where(per_row_mean, seq_kl, s_kl) * scale
    tl.store(loss_ptr, loss * dp_size)
    tl.store(grad_scale_ptr, scale * dp_size)

    # metrics (SPEC §6, isreshape_triton/metrics.py)
    c0, c1 = batch_ctx
    if SEQ_GAMMA:
        gamma = safe_div(s_g, n_all)
        gamma_pos = safe_div(x0, n_pos)
        gamma_neg = safe_div(x1, n_neg)
        gamma_base = safe_div(x4, n_all)
    else:
        gamma = c0
        gamma_pos = c0
        gamma_neg = c1
        gamma_base = c0
    ess = ess_of(ess_all)
    ess_p = ess_of(ess_pos)
    ess_n = ess_of(ess_neg)
    # diagnostics: biased moments as scipy.stats.skew / kurtosis in the units 1/r of M3, M4
    # (scale-free), 0 where scipy treats m2 as zero (m2 ≤ (1e-15·mean)²) or there is no token
    if FRAMED:  # power sums of z = (ℓ − c)·r
        c, r, u = frame
        a, m2z, m3_all, m4_all = central_sums(n_all, mean_all, m2_all, m3_all, m4_all)
        mean_all = c + a * u
        m2_all = (m2z * u) * u
    else:  # M3, M4 in units 2^moment_unit(count, M2)
        r = pow2(-moment_unit(n_all, m2_all), m2_all)
        m2z = (m2_all * r) * r
    c2 = safe_div(m2z, n_all)
    spread = ~(c2 <= (1e-15 * mean_all * r) * (1e-15 * mean_all * r))
    m = metrics_ptr  # the metric vector, by name (``layout.METRIC_FIELDS``)
    tl.store(m + M_TOKEN_COUNT, n_all)
    tl.store(m + M_PPO_KL, -tl.where(n_all > 0.0, mean_all, 0.0))
    tl.store(m + M_W_MEAN, safe_div(s_w, n_all))
    tl.store(m + M_W_MAX, w_max)
    tl.store(m + M_PHI_MEAN, safe_div(s_phi, n_all))
    tl.store(m + M_PHI_ABS_MAX, phi_max)
    tl.store(m + M_SIGMA_SQ, unbiased_var(n_all, m2_all))
    tl.store(m + M_ESS, ess)
    tl.store(m + M_ESS_RATIO, safe_div(ess, n_all))
    tl.store(m + M_GAMMA_MEAN, safe_div(s_g, n_all))
    tl.store(m + M_GAMMA_MIN, tl.where(n_all > 0.0, g_min, 0.0))
    tl.store(m + M_GAMMA_MAX, g_max)
    tl.store(m + M_GAMMA, gamma)
    tl.store(m + M_GAMMA_POS, gamma_pos)
    tl.store(m + M_GAMMA_NEG, gamma_neg)
    tl.store(m + M_SIGMA_SQ_POS, unbiased_var(n_pos, m2_pos))
    tl.store(m + M_SIGMA_SQ_NEG, unbiased_var(n_neg, m2_neg))
    tl.store(m + M_GAMMA_BASE, gamma_base)
    tl.store(m + M_SKEWNESS, tl.where(spread, safe_div(safe_div(m3_all, n_all), c2 * tl.sqrt(c2)), 0.0))
    tl.store(m + M_KURTOSIS, tl.where(spread, safe_div(safe_div(m4_all, n_all), c2 * c2) - 3.0, 0.0))
    tl.store(m + M_MAX_WEIGHT_RATIO, safe_div(w_max, s_w))
    tl.store(m + M_ESS_POS, ess_p)
    tl.store(m + M_ESS_RATIO_POS, safe_div(ess_p, n_pos))
    tl.store(m + M_ESS_NEG, ess_n)
    tl.store(m + M_ESS_RATIO_NEG, safe_div(ess_n, n_neg))
    tl.store(m + M_NONFINITE_TOKENS, nonfinite)
    tl.store(m + M_KL_LOSS, kl_loss * dp_size)
    # the rollout correction: over the tokens the mask counts before its rejection (n + rejected)
    r_sum, high, below, rejected, x_sum = rec[P_ROLLOUT:P_ROLLOUT + 5]
    n0 = n_all + rejected
    units = n0
    if ROW_FRACTIONS:
        units = S + tl.zeros([], dt)
    tl.store(m + M_ROLLOUT_IS_MEAN, safe_div(r_sum, n0))
    tl.store(m + M_ROLLOUT_IS_FRACTION_HIGH, safe_div(high, units))
    tl.store(m + M_ROLLOUT_IS_FRACTION_LOW, safe_div(below, units))
    tl.store(m + M_ROLLOUT_RS_MASKED_FRACTION, safe_div(rejected, n0))
    tl.store(m + M_ROLLOUT_KL, -safe_div(x_sum, n0))
    for k in tl.static_range(5):  # the family's extra metrics: token means of its extra terms
        tl.store(m + M_EXTRAS + k, safe_div(rec[P_EXTRAS + k], n_all))
