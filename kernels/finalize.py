"""The partial record of a program of the loss pass, and the last program's merge of
them in program order into the aggregated loss (SPEC §5), the metric vector
(SPEC §6) and the gradient scale; for the seq-* modes first finish the rows that
span chunks with a segmented scan over the chunks' head/tail elements (``rows.py``).

A record is a 40-tuple in the slot order of ``layout.P_*``. ``merge_record`` folds
a vector of records (a program's lanes, or every program's partial) in two
reductions of stacks: first the counts, Σ count·mean and the maxima, then, with
every summary re-centred on the common mean (Chan) and re-based on the common
max, all the remaining sums.
"""
import triton
import triton.language as tl

from .common import (ess_of, expsum_scale, max_nan, safe_div, shift_moments, shift_moments4, stack8,
                     stack8_offsets, unbiased_var, unstack8)
from .layout import (E_COUNT, E_FLAGS, E_KL, E_LOSS, E_ROW, ELEMENT_WIDTH, P_CENTRAL, P_COUNTS, P_ESS, P_EXTRAS,
                     METRIC_WIDTH, P_MAXIMA, PARTIAL_WIDTH, ROW_ENDS, ROW_STARTS)

TOKEN_MEAN = tl.constexpr(0)
TOKEN_SUM = tl.constexpr(1)
SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)
SEQ_MEAN_TOKEN_MEAN = tl.constexpr(3)
SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(4)


@triton.jit
def _given(v, dt: tl.constexpr, ON_DEVICE: tl.constexpr):
    """A count given as a float (< 0: not given) or, ON_DEVICE, as a pointer to a 0-dim
    device tensor (read here: no host sync)."""
    if ON_DEVICE:
        return tl.load(v).to(dt)
    else:
        return v + tl.zeros([], dt)


@triton.jit
def _sum_max(c_a, x_a, c_b, x_b):
    return c_a + c_b, max_nan(x_a, x_b)


@triton.jit
def _sum3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def merge_record(r):
    """One record (five [2, 2, 2] stacks, slot order) from a record of [L] vectors (see the
    module docstring); the maxima propagate NaN, an empty summary is neutral."""
    n_a, mean_a, n_p, mean_p, n_n, mean_n = r[0], r[1], r[2], r[3], r[4], r[5]
    counts, maxima = tl.reduce((stack8((n_a, n_a * mean_a, n_p, n_p * mean_p, n_n, n_n * mean_n, r[6], r[7])),
                                stack8(r[8:16])), 0, _sum_max)
    c_a, s_a, c_p, s_p, c_n, s_n, seq_loss, seq_kl = unstack8(counts)
    mu_a = s_a / tl.maximum(c_a, 1.0)
    mu_p = s_p / tl.maximum(c_p, 1.0)
    mu_n = s_n / tl.maximum(c_n, 1.0)
    z_all, z_pos, z_neg = r[12], r[13], r[14]
    mx = unstack8(maxima)
    f_a = expsum_scale(z_all, mx[4])
    f_p = expsum_scale(z_pos, mx[5])
    f_n = expsum_scale(z_neg, mx[6])
    m2, m3, m4 = shift_moments4(n_a, mean_a, r[16], r[17], r[18], mu_a)
    central, sums, extras = tl.reduce(
        (stack8((m2, m3, m4, shift_moments(n_p, mean_p, r[19], mu_p), shift_moments(n_n, mean_n, r[20], mu_n),
                 r[21] * f_a, r[22] * (f_a * f_a), r[23] * f_p)),
         stack8((r[24] * (f_p * f_p), r[25] * f_n, r[26] * (f_n * f_n), r[27], r[28], r[29], r[30], r[31])),
         stack8(r[32:40])), 0, _sum3)
    return stack8((c_a, mu_a, c_p, mu_p, c_n, mu_n, seq_loss, seq_kl)), maxima, central, sums, extras


@triton.jit
def store_record(ptr, stacks):
    """The five stacks of a merged record at ptr (slot order)."""
    at = ptr + stack8_offsets()
    for k in tl.static_range(5):  # re-stacked from scalars: stored without a layout exchange
        tl.store(at + 8 * k, stack8(unstack8(stacks[k])))


@triton.jit
def _slot(rows, slot: tl.constexpr, ok, other, USED: tl.constexpr):
    """Slot ``slot`` of every partial record (L1 bypassed: written by other programs), or
    ``other`` where the specialization never fills it (every program stored that constant)."""
    if USED:
        v = tl.load(rows + slot, mask=ok, other=other, cache_modifier=".cg")
    else:
        v = tl.full(ok.shape, other, rows.dtype.element_ty)
    return v


@triton.jit
def _load8(rows, slot: tl.constexpr, ok, other, USED: tl.constexpr):
    """Slots slot..slot+7 of every partial record; bit k of USED: slot + k is filled."""
    return (_slot(rows, slot, ok, other, USED % 2 == 1), _slot(rows, slot + 1, ok, other, USED // 2 % 2 == 1),
            _slot(rows, slot + 2, ok, other, USED // 4 % 2 == 1), _slot(rows, slot + 3, ok, other, USED // 8 % 2 == 1),
            _slot(rows, slot + 4, ok, other, USED // 16 % 2 == 1), _slot(rows, slot + 5, ok, other, USED // 32 % 2 == 1),
            _slot(rows, slot + 6, ok, other, USED // 64 % 2 == 1), _slot(rows, slot + 7, ok, other, USED // 128 % 2 == 1))


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
def _longest_row(cu_ptr, S, BLOCK: tl.constexpr):
    """max_s (cu[s+1] − cu[s]): the padded T of a packed batch."""
    idx = tl.arange(0, BLOCK)
    longest = tl.zeros([BLOCK], tl.int32)
    for s0 in range(0, S, BLOCK):
        s = s0 + idx
        lo = tl.load(cu_ptr + s, mask=s < S, other=0).to(tl.int32)
        hi = tl.load(cu_ptr + s + 1, mask=s < S, other=0).to(tl.int32)
        longest = tl.maximum(longest, hi - lo)
    return tl.max(longest)


@triton.jit
def finalize(partial_ptr, n_part, element_ptr, n_elements, row_count_ptr, cu_ptr,
             loss_ptr, metrics_ptr, grad_scale_ptr, batch_ctx, S, T,
             dp_size, global_token_count, global_batch_size, loss_scale_factor,
             agg, SEQ_AGG: tl.constexpr, SEQ_GAMMA: tl.constexpr, PACKED: tl.constexpr,
             COUNTS_ON_DEVICE: tl.constexpr, SIGN_GROUPS: tl.constexpr, HAS_KL: tl.constexpr,
             GAMMA_STATS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """All n_part (≤ BLOCK_P) partial records merged in one fixed-order tile; the loss,
    metrics (slot order = layout.METRIC_SLOTS) and the gradient scale s of SPEC §2
    (for seq-mean-token-mean the backward divides it by the row's n_b). COUNTS_ON_DEVICE:
    bit 0 global_token_count, bit 1 global_batch_size are 0-dim device tensors. The slots
    of the A>0 / A<0 groups (SIGN_GROUPS), the KL term (HAS_KL), the γ_t statistics
    (GAMMA_STATS) and the row sums (SEQ_AGG) are read only where the programs fill them."""
    p = tl.arange(0, BLOCK_P)
    ok = p < n_part
    rows = partial_ptr + p.to(tl.int64) * PARTIAL_WIDTH
    dt = partial_ptr.dtype.element_ty
    if SEQ_AGG:  # the rows that span chunks first, before the partials' registers are live
        span_loss, span_kl, span_rows = _spanning_rows(element_ptr, n_elements, row_count_ptr, dt, BLOCK_E)
    # every slot of every partial record, loaded before any is used (one L2 round trip);
    # absent programs are empty records (−inf maxima)
    SG: tl.constexpr = 1 if SIGN_GROUPS else 0
    KL: tl.constexpr = 1 if HAS_KL else 0
    GS: tl.constexpr = 1 if GAMMA_STATS else 0
    SQ: tl.constexpr = 1 if SEQ_AGG else 0
    rec = (_load8(rows, P_COUNTS, ok, 0.0, 3 + 60 * SG + 64 * SQ + 128 * SQ * KL)
           + _load8(rows, P_MAXIMA, ok, float("-inf"), 19 + 12 * GS + 96 * SG)
           + _load8(rows, P_CENTRAL, ok, 0.0, 103 + 152 * SG)
           + _load8(rows, P_CENTRAL + 8, ok, 0.0, 104 + 7 * SG + 16 * KL + 128 * GS)
           + _load8(rows, P_CENTRAL + 16, ok, 0.0, 63 + 64 * SQ))
    counts, maxima, central, sums, extras = merge_record(rec)
    n_all, mean_all, n_pos, mean_pos, n_neg, mean_neg, seq_loss_p, seq_kl_p = unstack8(counts)
    w_max, phi_max, g_max, neg_g_min, z_all, z_pos, z_neg, _ = unstack8(maxima)
    if not GAMMA_STATS:  # the programs' γ_t maximum is 0 (−inf is only the loads' default)
        g_max = tl.zeros_like(g_max)
    m2_all, m3_all, m4_all, m2_pos, m2_neg, s1_all, s2_all, s1_pos = unstack8(central)
    s2_pos, s1_neg, s2_neg, s_loss, s_kl, s_w, s_phi, s_g = unstack8(sums)
    x0, x1, x2, x3, x4, nonfinite, rows_p, _ = unstack8(extras)
    g_min = -neg_g_min
    ess_all = (z_all, s1_all, s2_all)
    ess_pos = (z_pos, s1_pos, s2_pos)
    ess_neg = (z_neg, s1_neg, s2_neg)

    # aggregation (SPEC §5); an empty denominator gives 0
    one = tl.full([], 1.0, dt)
    global_token_count = _given(global_token_count, dt, COUNTS_ON_DEVICE % 2 == 1)
    global_batch_size = _given(global_batch_size, dt, COUNTS_ON_DEVICE // 2 == 1)
    # every mode is (Σ m·L, or for seq-mean-token-mean Σ_b (Σ_t m·L)/n_b) × scale; ``agg`` is a
    # runtime code (one specialization for the token modes, one for the seq-* modes)
    seq_loss = s_loss
    seq_kl = s_kl
    gbs = one
    if SEQ_AGG:
        seq_loss = span_loss + seq_loss_p
        seq_kl = span_kl + seq_kl_p
        n_rows = span_rows + rows_p
        gbs = tl.where(global_batch_size >= 0.0, global_batch_size, n_rows)
    if agg == TOKEN_MEAN:
        scale = safe_div(one, tl.where(global_token_count >= 0.0, global_token_count, n_all))
    elif agg == TOKEN_SUM:
        scale = one
    elif agg == SEQ_MEAN_TOKEN_SUM_NORM:
        if PACKED:
            longest = _longest_row(cu_ptr, S, BLOCK_E).to(dt)
        else:
            longest = T * one
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
    # diagnostics: biased moments as scipy.stats.skew / kurtosis, 0 where scipy treats
    # m2 as zero (m2 ≤ (1e-15·mean)²) or there is no token
    cm2 = safe_div(m2_all, n_all)
    spread = ~(cm2 <= (1e-15 * mean_all) * (1e-15 * mean_all))
    zero = tl.zeros([], dt)
    metrics = (
        n_all, -tl.where(n_all > 0.0, mean_all, 0.0), safe_div(s_w, n_all), w_max,
        safe_div(s_phi, n_all), phi_max, unbiased_var(n_all, m2_all), ess,
        safe_div(ess, n_all), safe_div(s_g, n_all), tl.where(n_all > 0.0, g_min, 0.0), g_max,
        gamma, gamma_pos, gamma_neg, unbiased_var(n_pos, m2_pos),
        unbiased_var(n_neg, m2_neg), gamma_base, safe_div(x0, n_all), safe_div(x1, n_all),
        safe_div(x2, n_all), safe_div(x3, n_all), safe_div(x0, n_all), safe_div(x1, n_all),  # clipfrac(_lower): x0, x1
        tl.where(spread, safe_div(safe_div(m3_all, n_all), cm2 * tl.sqrt(cm2)), 0.0),
        tl.where(spread, safe_div(safe_div(m4_all, n_all), cm2 * cm2) - 3.0, 0.0),
        safe_div(w_max, s_w), ess_p, safe_div(ess_p, n_pos), ess_n, safe_div(ess_n, n_neg), nonfinite,
        kl_loss * dp_size, zero, zero, zero, zero, zero, zero, zero)
    at = stack8_offsets()
    for k in tl.static_range(5):  # five stacks of 8 metric slots, one store each
        tl.store(metrics_ptr + 8 * k + at, stack8(metrics[8 * k:8 * k + 8]), mask=8 * k + at < METRIC_WIDTH)
