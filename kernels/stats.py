"""Pass 1 (families with batch statistics): sufficient statistics of ℓ.

A persistent grid of P programs; program p owns rows p, p+P, … and walks each
row in BLOCK_T tiles. Per tile it takes two-pass moments and Chan-merges them
into the row, then the row into the program, always in the same order, so the
result is deterministic. It writes one statistics record (``layout.py``) per
row (``WRITE_ROWS``: per-sequence γ, VESPO) and/or one per program
(``WRITE_PROGRAMS``: batch γ, merged again by every program of pass 2).
"""
import triton
import triton.language as tl

from .common import chan_merge, load_token_tile, masked_moments, store_moments
from .gamma import ess_grid_terms
from .layout import S_AFIRST, S_GRID, S_LSUM, S_N_ALL, S_N_NEG, S_N_POS


@triton.jit
def _store_record(ptr, n0, m0, q0, n1, m1, q1, n2, m2, q2, lsum, a_first,
                  a_s1, a_s2, a_d1, a_d2, b_s1, b_s2, b_d1, b_d2,
                  ESS_EXACT: tl.constexpr, G: tl.constexpr):
    store_moments(ptr + S_N_ALL, n0, m0, q0)
    store_moments(ptr + S_N_POS, n1, m1, q1)
    store_moments(ptr + S_N_NEG, n2, m2, q2)
    tl.store(ptr + S_LSUM, lsum)
    tl.store(ptr + S_AFIRST, a_first)
    if ESS_EXACT:
        j = tl.arange(0, G)
        tl.store(ptr + S_GRID + j, a_s1)
        tl.store(ptr + S_GRID + G + j, a_s2)
        tl.store(ptr + S_GRID + 2 * G + j, a_d1)
        tl.store(ptr + S_GRID + 3 * G + j, a_d2)
        tl.store(ptr + S_GRID + 4 * G + j, b_s1)
        tl.store(ptr + S_GRID + 5 * G + j, b_s2)
        tl.store(ptr + S_GRID + 6 * G + j, b_d1)
        tl.store(ptr + S_GRID + 7 * G + j, b_d2)


@triton.jit(do_not_specialize=["R", "T", "s_lp_r", "s_lp_t", "s_olp_r", "s_olp_t",
                               "s_adv_r", "s_adv_t", "s_mask_r", "s_mask_t"])
def batch_stats_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, row_rec_ptr, prog_rec_ptr,
    R, T, s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r, s_mask_t,
    clamp, ga_lo, ga_hi, gb_lo, gb_hi,
    ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr,
    SIGN_GROUPS: tl.constexpr, ESS_EXACT: tl.constexpr, G: tl.constexpr, KS: tl.constexpr,
    WRITE_ROWS: tl.constexpr, WRITE_PROGRAMS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Statistics records of ℓ per row and per program (see module docstring)."""
    pid = tl.program_id(0)
    offs0 = tl.arange(0, BLOCK_T)
    zero = tl.zeros([], ACC)
    zg = tl.zeros([G], ACC)
    # program accumulators: (count, mean, M2) for all / pos / neg, Σℓ, ESS grids
    pn0, pm0, pq0, pn1, pm1, pq1, pn2, pm2, pq2, plsum = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    pa1, pa2, pa3, pa4, pb1, pb2, pb3, pb4 = zg, zg, zg, zg, zg, zg, zg, zg
    for row in range(pid, R, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        lp_row = lp_ptr + row64 * s_lp_r
        olp_row = olp_ptr + row64 * s_olp_r
        adv_row = adv_ptr + row64 * s_adv_r
        mask_row = mask_ptr + row64 * s_mask_r
        n0, m0, q0, n1, m1, q1, n2, m2, q2, lsum = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
        a1, a2, a3, a4, b1, b2, b3, b4 = zg, zg, zg, zg, zg, zg, zg, zg
        first = T
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + offs0
            # advantages are read only for the A>0 / A<0 groups (VESPO loads one per row below)
            ell, adv, m = load_token_tile(lp_row, olp_row, adv_row, mask_row, offs, T,
                                          s_lp_t, s_olp_t, s_adv_t, s_mask_t, clamp,
                                          ACC, HAS_ADV and SIGN_GROUPS, HAS_MASK)
            cn, cm, cq = masked_moments(ell, m)
            n0, m0, q0 = chan_merge(n0, m0, q0, cn, cm, cq)
            lsum += tl.sum(tl.where(m, ell, 0.0))
            first = tl.minimum(first, tl.min(tl.where(m, offs, T)))
            if SIGN_GROUPS:
                pos = m & (adv > 0.0)
                neg = m & (adv < 0.0)
                cn, cm, cq = masked_moments(ell, pos)
                n1, m1, q1 = chan_merge(n1, m1, q1, cn, cm, cq)
                cn, cm, cq = masked_moments(ell, neg)
                n2, m2, q2 = chan_merge(n2, m2, q2, cn, cm, cq)
            if ESS_EXACT:
                if SIGN_GROUPS:
                    t1, t2, t3, t4 = ess_grid_terms(ell, pos, ga_lo, ga_hi, G)
                    u1, u2, u3, u4 = ess_grid_terms(ell, neg, gb_lo, gb_hi, G)
                    b1, b2, b3, b4 = b1 + u1, b2 + u2, b3 + u3, b4 + u4
                else:
                    t1, t2, t3, t4 = ess_grid_terms(ell, m, ga_lo, ga_hi, G)
                a1, a2, a3, a4 = a1 + t1, a2 + t2, a3 + t3, a4 + t4
        a_first = zero + 1.0
        if HAS_ADV:
            a_first = tl.load(adv_row + first.to(tl.int64) * s_adv_t, mask=first < T, other=1.0).to(ACC)
        if WRITE_ROWS:
            _store_record(row_rec_ptr + row64 * KS, n0, m0, q0, n1, m1, q1, n2, m2, q2, lsum, a_first,
                          a1, a2, a3, a4, b1, b2, b3, b4, ESS_EXACT, G)
        pn0, pm0, pq0 = chan_merge(pn0, pm0, pq0, n0, m0, q0)
        pn1, pm1, pq1 = chan_merge(pn1, pm1, pq1, n1, m1, q1)
        pn2, pm2, pq2 = chan_merge(pn2, pm2, pq2, n2, m2, q2)
        plsum += lsum
        pa1, pa2, pa3, pa4 = pa1 + a1, pa2 + a2, pa3 + a3, pa4 + a4
        pb1, pb2, pb3, pb4 = pb1 + b1, pb2 + b2, pb3 + b3, pb4 + b4
    if WRITE_PROGRAMS:
        _store_record(prog_rec_ptr + pid.to(tl.int64) * KS, pn0, pm0, pq0, pn1, pm1, pq1, pn2, pm2, pq2,
                      plsum, zero + 1.0, pa1, pa2, pa3, pa4, pb1, pb2, pb3, pb4, ESS_EXACT, G)
