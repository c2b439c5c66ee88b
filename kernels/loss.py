"""Pass 2: per-token φ and F, the gradient, and the per-program partial sums.

Same persistent row ownership as pass 1. Each program first resolves the
family context (γ from the merged statistics records, or fixed parameters);
with ``ROW_STATS`` it resolves it again per row from that row's record, and with
``GAMMA_MODE == GAMMA_GIVEN`` it reads (c0, c1) computed on the device beforehand
(PSIS) at ``gamma_ptr + row * gamma_row_stride``. Per
tile: ℓ, w, family (φ, F), the unscaled gradient −m·φ (the backward multiplies
it by the aggregation scale times the incoming gradient), and the masked sums
of the loss and of every metric. One partial record per program (``layout.py``)
goes to ``finalize_kernel``; per-row counts go to ``row_count``.
"""
import triton
import triton.language as tl

from .common import (chan_merge, load_token_tile, masked_moments, masked_moments4, merge4,
                     store_moments)
from .families import VESPO, family_token, vespo_sequence_weight
from .gamma import GAMMA_GIVEN, family_context
from .layout import (P_GAMMA, P_GAMMA_MAX, P_GAMMA_MIN, P_LOSS, P_N, P_N_NEG, P_N_POS,
                     P_NEG_LOG_RATIO, P_OMEGA, P_PHI, P_PHI_ABS_MAX, P_ROWS, P_SEQ_LOSS, P_W,
                     P_W_MAX, P_X, PARTIAL_WIDTH, S_AFIRST, S_LSUM)


@triton.jit(do_not_specialize=["R", "T", "n_rec", "s_lp_r", "s_lp_t", "s_olp_r", "s_olp_t",
                               "s_adv_r", "s_adv_t", "s_mask_r", "s_mask_t"])
def token_loss_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, rec_ptr, n_rec, row_rec_ptr, gamma_ptr, gamma_row_stride,
    grad_ptr, row_count_ptr, partial_ptr, ctx_ptr,
    R, T, s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r, s_mask_t,
    clamp, p0, p1, p2, p3, p4, p5, p6, ga_lo, ga_hi, gb_lo, gb_hi,
    FAMILY: tl.constexpr, OPT: tl.constexpr, GAMMA_MODE: tl.constexpr,
    BATCH_STATS: tl.constexpr, ROW_STATS: tl.constexpr,
    ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr,
    KS: tl.constexpr, G: tl.constexpr, BLOCK_REC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Loss, metric partials and −m·φ for the rows this program owns.

    p0..p6 are the family's float parameters as packed by the family table (for the γ
    families p0 = ρ_min and p1/p2 the fixed γ, γ+, γ−); ga/gb are the γ intervals of
    groups a and b.
    """
    pid = tl.program_id(0)
    offs0 = tl.arange(0, BLOCK_T)
    zero = tl.zeros([], ACC)
    # batch context, identical in every program (same records, same order)
    if GAMMA_MODE == GAMMA_GIVEN:
        c0 = tl.load(gamma_ptr).to(ACC)
        c1 = tl.load(gamma_ptr + 1).to(ACC)
    else:
        c0, c1 = family_context(rec_ptr, n_rec, p0, p1, p2, ga_lo, ga_hi, gb_lo, gb_hi,
                                FAMILY, GAMMA_MODE, BATCH_STATS, KS, G, BLOCK_REC)
    if pid == 0:
        tl.store(ctx_ptr, c0)
        tl.store(ctx_ptr + 1, c1)
    n0, m0, q0, k3, k4, n1, m1, q1, n2, m2, q2 = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    s_loss, s_seq, s_rows, s_nlr, s_w, s_phi, s_g = zero, zero, zero, zero, zero, zero, zero
    s_om, s_om2, s_omp, s_omp2, s_omn, s_omn2 = zero, zero, zero, zero, zero, zero
    w_max, phi_max, g_max = zero, zero, zero
    g_min = zero + float("inf")
    x0, x1, x2, x3, x4 = zero, zero, zero, zero, zero
    for row in range(pid, R, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        lp_row = lp_ptr + row64 * s_lp_r
        olp_row = olp_ptr + row64 * s_olp_r
        adv_row = adv_ptr + row64 * s_adv_r
        mask_row = mask_ptr + row64 * s_mask_r
        r0, r1 = c0, c1
        if GAMMA_MODE == GAMMA_GIVEN:
            r0 = tl.load(gamma_ptr + row64 * gamma_row_stride).to(ACC)
            r1 = tl.load(gamma_ptr + row64 * gamma_row_stride + 1).to(ACC)
        elif ROW_STATS:
            rec = row_rec_ptr + row64 * KS
            if FAMILY == VESPO:
                r0 = vespo_sequence_weight(tl.load(rec + S_LSUM), tl.load(rec + S_AFIRST), clamp,
                                           p0, p1, p2, p3)
            else:
                r0, r1 = family_context(rec, 1, p0, p1, p2, ga_lo, ga_hi, gb_lo, gb_hi,
                                        FAMILY, GAMMA_MODE, ROW_STATS, KS, G, 2)
        row_loss = zero
        row_n = zero
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + offs0
            ell, adv, m = load_token_tile(lp_row, olp_row, adv_row, mask_row, offs, T,
                                          s_lp_t, s_olp_t, s_adv_t, s_mask_t, clamp,
                                          ACC, HAS_ADV, HAS_MASK)
            w = tl.exp(ell)
            phi, F, g, e0, e1, e2, e3, e4 = family_token(ell, w, adv, r0, r1, p0, p1, p2, p3, p4,
                                                         p5, p6, FAMILY, OPT)
            phi = tl.where(m, phi, 0.0)
            if WRITE_GRAD:
                tl.store(grad_ptr + row64 * T + offs, tl.where(m, -phi, 0.0), mask=offs < T)
            row_loss += tl.sum(tl.where(m, -F, 0.0))
            # metrics
            cn, cm, cq, c3, c4 = masked_moments4(ell, m)
            row_n += cn
            n0, m0, q0, k3, k4 = merge4(n0, m0, q0, k3, k4, cn, cm, cq, c3, c4)
            pos = m & (adv > 0.0)
            neg = m & (adv < 0.0)
            cn, cm, cq = masked_moments(ell, pos)
            n1, m1, q1 = chan_merge(n1, m1, q1, cn, cm, cq)
            cn, cm, cq = masked_moments(ell, neg)
            n2, m2, q2 = chan_merge(n2, m2, q2, cn, cm, cq)
            s_nlr += tl.sum(tl.where(m, -ell, 0.0))
            s_w += tl.sum(tl.where(m, w, 0.0))
            w_max = tl.maximum(w_max, tl.max(tl.where(m, w, 0.0)))
            s_phi += tl.sum(phi)
            phi_max = tl.maximum(phi_max, tl.max(tl.abs(phi)))
            om = tl.where(m, tl.exp(g * ell), 0.0)
            s_om += tl.sum(om)
            s_om2 += tl.sum(om * om)
            s_omp += tl.sum(tl.where(pos, om, 0.0))
            s_omp2 += tl.sum(tl.where(pos, om * om, 0.0))
            s_omn += tl.sum(tl.where(neg, om, 0.0))
            s_omn2 += tl.sum(tl.where(neg, om * om, 0.0))
            s_g += tl.sum(tl.where(m, g, 0.0))
            g_min = tl.minimum(g_min, tl.min(tl.where(m, g, float("inf"))))
            g_max = tl.maximum(g_max, tl.max(tl.where(m, g, 0.0)))
            x0 += tl.sum(tl.where(m, e0, 0.0))
            x1 += tl.sum(tl.where(m, e1, 0.0))
            x2 += tl.sum(tl.where(m, e2, 0.0))
            x3 += tl.sum(tl.where(m, e3, 0.0))
            x4 += tl.sum(tl.where(m, e4, 0.0))
        tl.store(row_count_ptr + row64, row_n)
        s_loss += row_loss
        s_seq += tl.where(row_n > 0.0, row_loss / tl.maximum(row_n, 1.0), 0.0)
        s_rows += tl.where(row_n > 0.0, 1.0, 0.0)
    out = partial_ptr + pid.to(tl.int64) * PARTIAL_WIDTH
    store_moments(out + P_N, n0, m0, q0)
    tl.store(out + P_N + 3, k3)
    tl.store(out + P_N + 4, k4)
    store_moments(out + P_N_POS, n1, m1, q1)
    store_moments(out + P_N_NEG, n2, m2, q2)
    tl.store(out + P_LOSS, s_loss)
    tl.store(out + P_SEQ_LOSS, s_seq)
    tl.store(out + P_ROWS, s_rows)
    tl.store(out + P_NEG_LOG_RATIO, s_nlr)
    tl.store(out + P_W, s_w)
    tl.store(out + P_W_MAX, w_max)
    tl.store(out + P_PHI, s_phi)
    tl.store(out + P_PHI_ABS_MAX, phi_max)
    tl.store(out + P_OMEGA, s_om)
    tl.store(out + P_OMEGA + 1, s_om2)
    tl.store(out + P_OMEGA + 2, s_omp)
    tl.store(out + P_OMEGA + 3, s_omp2)
    tl.store(out + P_OMEGA + 4, s_omn)
    tl.store(out + P_OMEGA + 5, s_omn2)
    tl.store(out + P_GAMMA, s_g)
    tl.store(out + P_GAMMA_MIN, g_min)
    tl.store(out + P_GAMMA_MAX, g_max)
    tl.store(out + P_X, x0)
    tl.store(out + P_X + 1, x1)
    tl.store(out + P_X + 2, x2)
    tl.store(out + P_X + 3, x3)
    tl.store(out + P_X + 4, x4)
