"""Pass 1 (families whose γ or weight needs statistics): records of ℓ.

A persistent grid walks the chunks (``rows.py``); per tile every lane updates
its own Welford moments (groups all / A>0 / A<0), for a batch record the frame
sums of pass 2's moments (count, Σℓ, max |ℓ|: ``common.batch_frame``) and, for
``ess_exact``, its grid sums. With ``ROW_STATS`` (per-sequence γ, VESPO) the lanes are reduced
once per piece into a record at the piece's element; otherwise once per program
into the program's record (each warp merges its lanes, then the warps' moments
through the program's scratch row: ``common.lane_summaries``), merged in a fixed
order by every program of pass 2.
"""
import triton
import triton.language as tl

from .common import lane_summaries, max_nan, moments_add, moments_init
from .gamma import ess_grid_terms
from .layout import CORR_WIDTH, S_AFIRST, S_ASUM, S_FRAME, S_GRID, S_LSUM, S_N_ALL, S_N_NEG, S_N_POS
from .rollout import corr_add, corr_init, per_row, store_corr_record
from .rows import load_raw, locate_row, piece_end, prologue_stop, streams, token_values


@triton.jit
def _grid_init(BLOCK: tl.constexpr, G: tl.constexpr, dt: tl.constexpr):
    z = tl.zeros([BLOCK, G], dt)
    return z, z, z, z


@triton.jit
def _lanes_init(BLOCK: tl.constexpr, G: tl.constexpr, dt: tl.constexpr):
    """Empty lane accumulators: moments of all / A>0 / A<0, Σℓ, ESS grid sums of groups a and b."""
    like = tl.zeros([BLOCK], dt)
    return (moments_init(like), moments_init(like), moments_init(like), like,
            _grid_init(BLOCK, G, dt), _grid_init(BLOCK, G, dt))


@triton.jit
def _grid_add(acc, ell, m, lo, hi, G: tl.constexpr):
    e, e2, le, le2 = ess_grid_terms(ell, m, lo, hi, G)
    a1, a2, a3, a4 = acc
    return a1 + e, a2 + e2, a3 + le, a4 + le2


@triton.jit
def _store_moments(ptr, summary):
    n, mean, m2 = summary
    tl.store(ptr, n)
    tl.store(ptr + 1, mean)
    tl.store(ptr + 2, m2)


@triton.jit
def _store_grid(ptr, acc, G: tl.constexpr):
    j = tl.arange(0, G)
    a1, a2, a3, a4 = acc
    tl.store(ptr + j, tl.sum(a1, 0))
    tl.store(ptr + G + j, tl.sum(a2, 0))
    tl.store(ptr + 2 * G + j, tl.sum(a3, 0))
    tl.store(ptr + 3 * G + j, tl.sum(a4, 0))


@triton.jit
def _store_record(ptr, all_, pos, neg, lsum, asum, a_first, frame, grid_a, grid_b,
                  SIGN_GROUPS: tl.constexpr, ESS_EXACT: tl.constexpr, G: tl.constexpr):
    """A record from the (count, mean, M2) summaries of the groups, the row-term sums Σz and Σa,
    the first counted A, the frame sums and the lanes' ESS grid sums."""
    _store_moments(ptr + S_N_ALL, all_)
    _store_moments(ptr + S_N_POS, pos)
    _store_moments(ptr + S_N_NEG, neg)
    tl.store(ptr + S_LSUM, lsum)
    tl.store(ptr + S_ASUM, asum)
    tl.store(ptr + S_AFIRST, a_first)
    _store_moments(ptr + S_FRAME, frame)
    if ESS_EXACT:
        _store_grid(ptr + S_GRID, grid_a, G)
        if SIGN_GROUPS:
            _store_grid(ptr + S_GRID + 4 * G, grid_b, G)


@triton.jit
def _summaries(all_, pos, neg, frame, scratch_ptr, SIGN_GROUPS: tl.constexpr, FRAME: tl.constexpr,
               W: tl.constexpr):
    """The (count, mean, M2) of the lanes per group that pass 2 reads (all, or A>0 and A<0 for the
    sign family) and with FRAME the frame sums (count, Σℓ, max |ℓ|) of all tokens
    (``common.lane_summaries``), 0 for the others."""
    zero = tl.zeros([], all_[0].dtype)
    none = (zero, zero, zero)
    if SIGN_GROUPS and FRAME:
        s_pos, s_neg, s_frame = lane_summaries((pos, neg, frame), scratch_ptr, W, 4)
        out = (none, s_pos, s_neg, s_frame)
    elif SIGN_GROUPS:
        s_pos, s_neg = lane_summaries((pos, neg), scratch_ptr, W)
        out = (none, s_pos, s_neg, none)
    elif FRAME:
        s_all, s_frame = lane_summaries((all_, frame), scratch_ptr, W, 2)
        out = (s_all, none, none, s_frame)
    else:
        s_all = lane_summaries((all_,), scratch_ptr, W)[0]
        out = (s_all, none, none, none)
    return out


@triton.jit(do_not_specialize=["N", "T", "S", "chunk", "n_chunks", "s_lp_r", "s_lp_t", "s_olp_r",
                               "s_olp_t", "s_adv_r", "s_adv_t", "s_mask_r", "s_mask_t",
                               "s_rollout_r", "s_rollout_t", "s_ref_r", "s_ref_t"])
def batch_stats_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, rollout_ptr, ref_ptr, cu_ptr, rec_ptr, corr_ptr, scratch_ptr, scratch_stride,
    N, T, S, chunk, n_chunks,
    s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r, s_mask_t,
    s_rollout_r, s_rollout_t, s_ref_r, s_ref_t,
    clamp, gamma_rule, params, corr,
    ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
    ROLLOUT_IN_ROW: tl.constexpr, CORRECTION: tl.constexpr, HAS_REF: tl.constexpr, PACKED: tl.constexpr,
    UNIT_STRIDE: tl.constexpr,
    SIGN_GROUPS: tl.constexpr, ESS_EXACT: tl.constexpr, G: tl.constexpr, KS: tl.constexpr,
    FAMILY_STATS: tl.constexpr, ROW_STATS: tl.constexpr, ROW_TERM: tl.constexpr, WARPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Statistics records of ℓ per piece (ROW_STATS) or per program (see module docstring).
    A row's sums: Σ m·ℓ, or with the family's ``ROW_TERM`` (z, a) = ROW_TERM(ℓ, A, params)
    Σ m·z and Σ m·a; ROLLOUT_IN_ROW (rollout IS weights that enter the row weight): Σ m·z also
    sums log max(r, 1e-8). HAS_ROLLOUT: the rollout stream is read (for ROLLOUT_IN_ROW, or for the
    rejection of a rollout correction (CORRECTION, ``corr``), which leaves the count mask). A
    correction of a row quantity (``rollout.per_row``) writes one record per piece to corr_ptr
    (``rollout.store_corr_record``, indexed as the row statistics); FAMILY_STATS: the family's
    statistics (without, the pass runs for those records alone). scratch_ptr:
    a free row of ``scratch_stride`` ≥ 9·WARPS values per program (the loss pass's partials);
    WARPS: the launch's warps if BLOCK_T is a multiple of 32·WARPS, else 0."""
    lp, olp, adv, mask, rollout, ref = streams(lp_ptr, olp_ptr, adv_ptr, mask_ptr, rollout_ptr, ref_ptr,
                                               s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r,
                                               s_mask_t, s_rollout_r, s_rollout_t, s_ref_r, s_ref_t, UNIT_STRIDE,
                                               PACKED)
    rho, fixed_a, fixed_b, a_lo, a_hi, b_lo, b_hi = gamma_rule
    READ_ADV: tl.constexpr = HAS_ADV and (SIGN_GROUPS or ROW_TERM is not None)
    CORR_ROWS: tl.constexpr = HAS_ROLLOUT and per_row(CORRECTION)
    no_row = (tl.full([], 1.0, ACC), tl.full([], 1, tl.int1))  # pass 1 knows no row's correction yet
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_T)
    all_, pos, neg, lsum, grid_a, grid_b = _lanes_init(BLOCK_T, G, ACC)
    frame = (lsum, lsum, lsum)  # batch records: count, Σℓ and max |ℓ| of all tokens (pass 2's frame)
    for c in range(pid, n_chunks, tl.num_programs(0)):
        a = c * chunk
        b = tl.minimum(a + chunk, N)
        p = a
        while p < b:
            s, start, end = locate_row(p, cu_ptr, S, T, N, PACKED)
            e = piece_end(p, end, b)
            origin = 0 if PACKED else start
            if ROW_STATS:  # one record per piece
                all_, pos, neg, lsum, grid_a, grid_b = _lanes_init(BLOCK_T, G, ACC)
                asum = lsum
                first = tl.zeros([BLOCK_T], tl.int32) + e
            if CORR_ROWS:
                corr_sums = corr_init(tl.zeros([BLOCK_T], ACC))
            # advantages are read only for the A>0 / A<0 groups and a row term (VESPO reads one per piece)
            raw = load_raw(lp, olp, adv, mask, rollout, ref, s, origin, p + lanes, prologue_stop(e, b, PACKED),
                           READ_ADV, HAS_MASK, HAS_ROLLOUT, False)
            for t0 in range(p, e, BLOCK_T):
                offs = t0 + lanes
                ahead = load_raw(lp, olp, adv, mask, rollout, ref, s, origin, offs + BLOCK_T, e,
                                 READ_ADV, HAS_MASK, HAS_ROLLOUT, False)
                ell, A, m, bad, r, x, m0_x = token_values(raw, offs, e, start, end, clamp, corr, no_row, ACC,
                                                          READ_ADV, HAS_MASK, HAS_ROLLOUT, False, PACKED, CORRECTION)
                raw = ahead
                if CORR_ROWS:
                    corr_sums = corr_add(corr_sums, m0_x[1], m0_x[0], clamp, CORRECTION)
                if FAMILY_STATS and not SIGN_GROUPS:  # the sign family's γ± read only its groups
                    all_ = moments_add(all_, ell, m)
                if SIGN_GROUPS:
                    pos = moments_add(pos, ell, m & (A > 0.0))
                    neg = moments_add(neg, ell, m & (A < 0.0))
                    if ESS_EXACT:
                        grid_a = _grid_add(grid_a, ell, m & (A > 0.0), a_lo, a_hi, G)
                        grid_b = _grid_add(grid_b, ell, m & (A < 0.0), b_lo, b_hi, G)
                elif ESS_EXACT:
                    grid_a = _grid_add(grid_a, ell, m, a_lo, a_hi, G)
                if FAMILY_STATS and not ROW_STATS:
                    f_n, f_total, f_largest = frame
                    frame = (f_n + tl.where(m, 1.0, 0.0), f_total + ell, max_nan(f_largest, tl.abs(ell)))
                if ROW_STATS:
                    if ROW_TERM is not None:
                        z, a_term = ROW_TERM(ell, A, params)
                        lsum += tl.where(m, z, 0.0)
                        asum += tl.where(m, a_term, 0.0)
                    else:
                        lsum += ell
                    if ROLLOUT_IN_ROW:
                        lsum += tl.where(m, tl.log(max_nan(r, 1e-8)), 0.0)  # a NaN r (bad) keeps W NaN
                    first = tl.minimum(first, tl.where(m, offs, e))
            element = tl.where(start < a, 2 * c, 2 * c + 1)  # head / tail of the chunk
            element = tl.where((start >= a) & (end <= b), 2 * n_chunks + s, element)  # complete row
            if CORR_ROWS:
                store_corr_record(corr_ptr + element.to(tl.int64) * CORR_WIDTH, corr_sums, CORRECTION)
            if ROW_STATS:
                a_first = tl.zeros([], ACC) + 1.0
                f = tl.min(first)
                if HAS_ADV:
                    a_first = tl.load(adv_ptr + s.to(tl.int64) * s_adv_r + (f - origin).to(tl.int64) * s_adv_t,
                                      mask=f < e, other=1.0).to(ACC)
                s_all, s_pos, s_neg, s_frame = _summaries(all_, pos, neg, frame, scratch_ptr, SIGN_GROUPS, False, 0)
                if ROW_TERM is not None:  # Σz and Σa in one reduction
                    z_total, a_total = tl.split(tl.sum(tl.join(lsum, asum), axis=0))
                else:  # no reduction of an empty Σa
                    z_total, a_total = tl.sum(lsum), tl.zeros([], ACC)
                _store_record(rec_ptr + element.to(tl.int64) * KS, s_all, s_pos, s_neg, z_total, a_total,
                              a_first, s_frame, grid_a, grid_b, SIGN_GROUPS, ESS_EXACT, G)
            p = e
    if FAMILY_STATS and not ROW_STATS:
        all_, pos, neg, frame = _summaries(all_, pos, neg, frame, scratch_ptr + pid.to(tl.int64) * scratch_stride,
                                           SIGN_GROUPS, True, WARPS)
        zero = tl.zeros([], ACC)
        _store_record(rec_ptr + pid.to(tl.int64) * KS, all_, pos, neg, zero, zero, zero + 1.0, frame, grid_a,
                      grid_b, SIGN_GROUPS, ESS_EXACT, G)
