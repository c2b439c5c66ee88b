"""Pass 3 (one program): merge the partial records in a fixed order into the
aggregated loss (SPEC §5), the metric vector (SPEC §6) and the per-row gradient
scale s_b = ∂aggregate/∂L_t for the tokens of row b."""
import triton
import triton.language as tl

from .common import merge_moments, merge_records, safe_div, unbiased_var
from .layout import (P_GAMMA, P_GAMMA_MAX, P_GAMMA_MIN, P_LOSS, P_N, P_N_NEG, P_N_POS,
                     P_NEG_LOG_RATIO, P_OMEGA, P_PHI, P_PHI_ABS_MAX, P_ROWS,
                     P_SEQ_LOSS, P_W, P_W_MAX, P_X, PARTIAL_WIDTH)

TOKEN_MEAN = tl.constexpr(0)
TOKEN_SUM = tl.constexpr(1)
SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)
SEQ_MEAN_TOKEN_MEAN = tl.constexpr(3)
SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(4)


@triton.jit
def finalize_kernel(
    partial_ptr, n_part, ctx_ptr, row_count_ptr, row_scale_ptr, loss_ptr, metrics_ptr,
    R, T, dp_size, global_token_count, global_batch_size, loss_scale_factor,
    SEQ_GAMMA: tl.constexpr, AGG: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """All n_part (≤ BLOCK_P) partial records are merged in one fixed-order tile.
    global_* < 0 means "not given": the local token count / non-empty rows / T is used."""
    p = tl.arange(0, BLOCK_P)
    ok = p < n_part
    rows = partial_ptr + p * PARTIAL_WIDTH
    dt = partial_ptr.dtype.element_ty
    n_all, mean_all, m2_all, m3_all, m4_all = merge_records(partial_ptr, n_part, P_N, PARTIAL_WIDTH,
                                                            BLOCK_P, True)
    var_all = unbiased_var(n_all, m2_all)
    n_pos, var_pos = merge_moments(partial_ptr, n_part, P_N_POS, PARTIAL_WIDTH, BLOCK_P)
    n_neg, var_neg = merge_moments(partial_ptr, n_part, P_N_NEG, PARTIAL_WIDTH, BLOCK_P)
    s_loss = tl.sum(tl.load(rows + P_LOSS, mask=ok, other=0.0))
    s_seq = tl.sum(tl.load(rows + P_SEQ_LOSS, mask=ok, other=0.0))
    n_rows = tl.sum(tl.load(rows + P_ROWS, mask=ok, other=0.0))
    s_nlr = tl.sum(tl.load(rows + P_NEG_LOG_RATIO, mask=ok, other=0.0))
    s_w = tl.sum(tl.load(rows + P_W, mask=ok, other=0.0))
    w_max = tl.max(tl.load(rows + P_W_MAX, mask=ok, other=0.0))
    s_phi = tl.sum(tl.load(rows + P_PHI, mask=ok, other=0.0))
    phi_max = tl.max(tl.load(rows + P_PHI_ABS_MAX, mask=ok, other=0.0))
    s_om = tl.sum(tl.load(rows + P_OMEGA, mask=ok, other=0.0))
    s_om2 = tl.sum(tl.load(rows + P_OMEGA + 1, mask=ok, other=0.0))
    s_omp = tl.sum(tl.load(rows + P_OMEGA + 2, mask=ok, other=0.0))
    s_omp2 = tl.sum(tl.load(rows + P_OMEGA + 3, mask=ok, other=0.0))
    s_omn = tl.sum(tl.load(rows + P_OMEGA + 4, mask=ok, other=0.0))
    s_omn2 = tl.sum(tl.load(rows + P_OMEGA + 5, mask=ok, other=0.0))
    s_g = tl.sum(tl.load(rows + P_GAMMA, mask=ok, other=0.0))
    g_min = tl.min(tl.load(rows + P_GAMMA_MIN, mask=ok, other=float("inf")))
    g_max = tl.max(tl.load(rows + P_GAMMA_MAX, mask=ok, other=0.0))
    x0 = tl.sum(tl.load(rows + P_X, mask=ok, other=0.0))
    x1 = tl.sum(tl.load(rows + P_X + 1, mask=ok, other=0.0))
    x2 = tl.sum(tl.load(rows + P_X + 2, mask=ok, other=0.0))
    x3 = tl.sum(tl.load(rows + P_X + 3, mask=ok, other=0.0))
    x4 = tl.sum(tl.load(rows + P_X + 4, mask=ok, other=0.0))

    # aggregation (SPEC §5); an empty denominator gives 0
    gtc = tl.where(global_token_count >= 0.0, global_token_count, n_all)
    gbs = tl.where(global_batch_size >= 0.0, global_batch_size, n_rows)
    lsf = tl.where(loss_scale_factor >= 0.0, loss_scale_factor, T * 1.0)
    if AGG == TOKEN_MEAN:
        loss = safe_div(s_loss, gtc)
        scale = safe_div(tl.full([], 1.0, dt), gtc)
    elif AGG == TOKEN_SUM:
        loss = s_loss
        scale = tl.full([], 1.0, dt)
    elif AGG == SEQ_MEAN_TOKEN_SUM:
        loss = safe_div(s_loss, gbs)
        scale = safe_div(tl.full([], 1.0, dt), gbs)
    elif AGG == SEQ_MEAN_TOKEN_MEAN:
        loss = safe_div(s_seq, gbs)
        scale = safe_div(tl.full([], 1.0, dt), gbs)
    else:
        loss = safe_div(s_loss, gbs * lsf)
        scale = safe_div(tl.full([], 1.0, dt), gbs * lsf)
    tl.store(loss_ptr, loss * dp_size)
    r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + r
        s = dp_size * scale + tl.zeros([BLOCK_R], dt)
        if AGG == SEQ_MEAN_TOKEN_MEAN:
            n_b = tl.load(row_count_ptr + rr, mask=rr < R, other=0.0)
            s = safe_div(s, n_b)
        tl.store(row_scale_ptr + rr, s, mask=rr < R)

    # metrics (SPEC §6, isreshape_triton/metrics.py); slot order = layout.METRIC_SLOTS
    ess = safe_div(s_om * s_om, s_om2)
    c0 = tl.load(ctx_ptr)
    c1 = tl.load(ctx_ptr + 1)
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
    m = metrics_ptr
    tl.store(m + 0, n_all)
    tl.store(m + 1, safe_div(s_nlr, n_all))
    tl.store(m + 2, safe_div(s_w, n_all))
    tl.store(m + 3, w_max)
    tl.store(m + 4, safe_div(s_phi, n_all))
    tl.store(m + 5, phi_max)
    tl.store(m + 6, var_all)
    tl.store(m + 7, ess)
    tl.store(m + 8, safe_div(ess, n_all))
    tl.store(m + 9, safe_div(s_g, n_all))
    tl.store(m + 10, tl.where(n_all > 0.0, g_min, 0.0))
    tl.store(m + 11, g_max)
    tl.store(m + 12, gamma)
    tl.store(m + 13, gamma_pos)
    tl.store(m + 14, gamma_neg)
    tl.store(m + 15, var_pos)
    tl.store(m + 16, var_neg)
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
    spread = cm2 > (1e-15 * mean_all) * (1e-15 * mean_all)
    tl.store(m + 24, tl.where(spread, safe_div(safe_div(m3_all, n_all), cm2 * tl.sqrt(cm2)), 0.0))
    tl.store(m + 25, tl.where(spread, safe_div(safe_div(m4_all, n_all), cm2 * cm2) - 3.0, 0.0))
    tl.store(m + 26, safe_div(w_max, s_w))
    ess_pos = safe_div(s_omp * s_omp, s_omp2)
    ess_neg = safe_div(s_omn * s_omn, s_omn2)
    tl.store(m + 27, ess_pos)
    tl.store(m + 28, safe_div(ess_pos, n_pos))
    tl.store(m + 29, ess_neg)
    tl.store(m + 30, safe_div(ess_neg, n_neg))
