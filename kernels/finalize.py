"""The last program of the loss pass: merge the partial records in program order
into the aggregated loss (SPEC §5), the metric vector (SPEC §6) and the gradient
scale; for the seq-* modes first finish the rows that span chunks with a
segmented scan over the chunks' head/tail elements (``rows.py``)."""
import triton
import triton.language as tl

from .common import (ess_of, expsum_reduce, moments4_reduce, moments_reduce, reduce_max, safe_div,
                     unbiased_var)
from .layout import (E_COUNT, E_FLAGS, E_KL, E_LOSS, E_ROW, ELEMENT_WIDTH, P_KL, P_SEQ_KL, P_ESS, P_EXTRAS, P_GAMMA,
                     P_LOSS, P_MOMENTS, P_MOMENTS_NEG, P_MOMENTS_POS, P_NONFINITE, P_PHI,
                     P_PHI_ABS_MAX, P_ROWS, P_SEQ_LOSS, P_W, P_W_MAX, PARTIAL_WIDTH, ROW_ENDS,
                     ROW_STARTS)

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
def _load(rows, slot, ok, other=0.0):
    """Slot ``slot`` of every partial record (L1 bypassed: written by other programs)."""
    return tl.load(rows + slot, mask=ok, other=other, cache_modifier=".cg")


@triton.jit
def _expsum_slots(rows, slot, ok):
    """(max z, Σe^{z−max}, Σe^{2(z−max)}) of every partial record (−inf max where absent)."""
    return _load(rows, slot, ok, float("-inf")), _load(rows, slot + 1, ok), _load(rows, slot + 2, ok)


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
             COUNTS_ON_DEVICE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """All n_part (≤ BLOCK_P) partial records merged in one fixed-order tile; the loss,
    metrics (slot order = layout.METRIC_SLOTS) and the gradient scale s of SPEC §2
    (for seq-mean-token-mean the backward divides it by the row's n_b). COUNTS_ON_DEVICE:
    bit 0 global_token_count, bit 1 global_batch_size are 0-dim device tensors."""
    p = tl.arange(0, BLOCK_P)
    ok = p < n_part
    rows = partial_ptr + p.to(tl.int64) * PARTIAL_WIDTH
    dt = partial_ptr.dtype.element_ty
    if SEQ_AGG:  # the rows that span chunks first, before the partials' registers are live
        span_loss, span_kl, span_rows = _spanning_rows(element_ptr, n_elements, row_count_ptr, dt, BLOCK_E)
    # every slot of every partial record, loaded before any is used (one L2 round trip);
    # each slot is a lane vector, reduced like the programs' own lane accumulators
    moments = (_load(rows, P_MOMENTS, ok), _load(rows, P_MOMENTS + 1, ok), _load(rows, P_MOMENTS + 2, ok),
               _load(rows, P_MOMENTS + 3, ok), _load(rows, P_MOMENTS + 4, ok))
    pos = (_load(rows, P_MOMENTS_POS, ok), _load(rows, P_MOMENTS_POS + 1, ok), _load(rows, P_MOMENTS_POS + 2, ok))
    neg = (_load(rows, P_MOMENTS_NEG, ok), _load(rows, P_MOMENTS_NEG + 1, ok), _load(rows, P_MOMENTS_NEG + 2, ok))
    loss_v = _load(rows, P_LOSS, ok)
    kl_v = _load(rows, P_KL, ok)
    w_v = _load(rows, P_W, ok)
    w_max_v = _load(rows, P_W_MAX, ok)
    phi_v = _load(rows, P_PHI, ok)
    phi_max_v = _load(rows, P_PHI_ABS_MAX, ok)
    ess_v = _expsum_slots(rows, P_ESS, ok)
    ess_pos_v = _expsum_slots(rows, P_ESS + 3, ok)
    ess_neg_v = _expsum_slots(rows, P_ESS + 6, ok)
    g_v = _load(rows, P_GAMMA, ok)
    g_min_v = _load(rows, P_GAMMA + 1, ok, float("inf"))
    g_max_v = _load(rows, P_GAMMA + 2, ok)
    x_v = (_load(rows, P_EXTRAS, ok), _load(rows, P_EXTRAS + 1, ok), _load(rows, P_EXTRAS + 2, ok),
           _load(rows, P_EXTRAS + 3, ok), _load(rows, P_EXTRAS + 4, ok))
    nonfinite_v = _load(rows, P_NONFINITE, ok)
    if SEQ_AGG:
        seq_loss_v = _load(rows, P_SEQ_LOSS, ok)
        seq_kl_v = _load(rows, P_SEQ_KL, ok)
        rows_v = _load(rows, P_ROWS, ok)

    n_all, mean_all, m2_all, m3_all, m4_all = moments4_reduce(moments)
    n_pos, mean_pos, m2_pos = moments_reduce(pos)
    n_neg, mean_neg, m2_neg = moments_reduce(neg)
    s_loss = tl.sum(loss_v)
    s_kl = tl.sum(kl_v)
    s_w = tl.sum(w_v)
    w_max = reduce_max(w_max_v)
    s_phi = tl.sum(phi_v)
    phi_max = reduce_max(phi_max_v)
    ess_all = expsum_reduce(ess_v)
    ess_pos = expsum_reduce(ess_pos_v)
    ess_neg = expsum_reduce(ess_neg_v)
    s_g = tl.sum(g_v)
    g_min = -reduce_max(-g_min_v)
    g_max = reduce_max(g_max_v)
    x0 = tl.sum(x_v[0])
    x1 = tl.sum(x_v[1])
    x2 = tl.sum(x_v[2])
    x3 = tl.sum(x_v[3])
    x4 = tl.sum(x_v[4])
    nonfinite = tl.sum(nonfinite_v)

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
        seq_loss = span_loss + tl.sum(seq_loss_v)
        seq_kl = span_kl
        n_rows = span_rows
        seq_kl += tl.sum(seq_kl_v)
        n_rows += tl.sum(rows_v)
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
    m = metrics_ptr
    tl.store(m + 0, n_all)
    tl.store(m + 1, -tl.where(n_all > 0.0, mean_all, 0.0))
    tl.store(m + 2, safe_div(s_w, n_all))
    tl.store(m + 3, w_max)
    tl.store(m + 4, safe_div(s_phi, n_all))
    tl.store(m + 5, phi_max)
    tl.store(m + 6, unbiased_var(n_all, m2_all))
    tl.store(m + 7, ess)
    tl.store(m + 8, safe_div(ess, n_all))
    tl.store(m + 9, safe_div(s_g, n_all))
    tl.store(m + 10, tl.where(n_all > 0.0, g_min, 0.0))
    tl.store(m + 11, g_max)
    tl.store(m + 12, gamma)
    tl.store(m + 13, gamma_pos)
    tl.store(m + 14, gamma_neg)
    tl.store(m + 15, unbiased_var(n_pos, m2_pos))
    tl.store(m + 16, unbiased_var(n_neg, m2_neg))
    tl.store(m + 17, gamma_base)
    tl.store(m + 18, safe_div(x0, n_all))
    tl.store(m + 19, safe_div(x1, n_all))
    tl.store(m + 20, safe_div(x2, n_all))
    tl.store(m + 21, safe_div(x3, n_all))
    tl.store(m + 22, safe_div(x0, n_all))  # clipfrac and clipfrac_lower share x0/x1 with p_case
    tl.store(m + 23, safe_div(x1, n_all))
    # diagnostics: biased moments as scipy.stats.skew / kurtosis, 0 where scipy treats
    # m2 as zero (m2 ≤ (1e-15·mean)²) or there is no token
    cm2 = safe_div(m2_all, n_all)
    spread = ~(cm2 <= (1e-15 * mean_all) * (1e-15 * mean_all))
    tl.store(m + 24, tl.where(spread, safe_div(safe_div(m3_all, n_all), cm2 * tl.sqrt(cm2)), 0.0))
    tl.store(m + 25, tl.where(spread, safe_div(safe_div(m4_all, n_all), cm2 * cm2) - 3.0, 0.0))
    tl.store(m + 26, safe_div(w_max, s_w))
    ess_p = ess_of(ess_pos)
    ess_n = ess_of(ess_neg)
    tl.store(m + 27, ess_p)
    tl.store(m + 28, safe_div(ess_p, n_pos))
    tl.store(m + 29, ess_n)
    tl.store(m + 30, safe_div(ess_n, n_neg))
    tl.store(m + 31, nonfinite)
    tl.store(m + 32, kl_loss * dp_size)
