"""Pass 2 (one launch for every family): per-token φ and F, the unscaled gradient
−m·φ, lane-accumulated metric sums, and, in the last program to finish, the
aggregated loss and metrics (``finalize.py``).

Each program walks its chunks (``rows.py``). Per piece it resolves the family
context: fixed, the batch context merged from pass 1's program records (the
same records in the same order in every program, so every program gets the
same bits), the row's context merged from pass 1's piece records, or the γ
computed beforehand on the device (PSIS). Per tile every lane updates its own
accumulators; lanes are reduced once per piece (row sums for the seq-* modes)
and once per program (the partial record). The kernel's steps, in order:
``_batch_context``; per piece ``_row_context``; per tile ``token_values``,
``_token_loss`` (the family's φ, L_t, ∂L_t/∂lp_t), ``_row_add`` and ``_accumulate``;
per piece ``_finish_piece``; then ``_partial_record``, the ticket and, in the last
program, ``finalize``.

Completion: each program publishes its partial record, then takes a ticket
(``atomic_add`` with acq_rel semantics at GPU scope, after a CTA barrier so that
every thread's stores precede the release). The program that draws the last
ticket has, by the acquire, every other program's partials visible; it reads
them bypassing L1 (``.cg``), merges them in program order (deterministic) and
resets the ticket to 0 for the next launch. No program ever waits for another,
so this is correct on a GPU (any schedule) and in the interpreter (programs run
in order, the last pid finalizes).
"""
import triton
import triton.language as tl

from .common import (expsum_add, expsum_init, max_nan, min_nan, moments_add, moments_init, power_sums_add,
                     power_sums_init, power_sums_moments, put, safe_div)
from .finalize import finalize, reduce_record, store_record
from .gamma import GAMMA_GIVEN, family_context, merge_sequence_sums
from .kl import KL_NONE, kl_penalty
from .layout import (CORR_WIDTH, E_COUNT, E_FLAGS, E_KL, E_LOSS, E_ROW, ELEMENT_WIDTH, P_ESS, P_ESS_NEG, P_ESS_POS,
                     P_EXTRAS, P_G_MAX, P_GAMMA, P_KL, P_LOSS, P_M2, P_M2_NEG, P_M2_POS, P_N_ALL, P_N_NEG, P_N_POS,
                     P_NEG_G_MIN, P_NONFINITE, P_PHI, P_PHI_MAX, P_ROLLOUT, P_ROWS, P_SEQ_KL, P_SEQ_LOSS, P_W,
                     P_W_MAX, P_Z_ALL, P_Z_NEG, P_Z_POS, PARTIAL_SCRATCH, PARTIAL_WIDTH, POSITION_SPLIT, ROW_ENDS,
                     ROW_STARTS)
from .rollout import per_row, row_correction, sequence_weight
from .rows import (load_raw, locate_row, log_probs, piece_end, prologue_stop, row_elements, streams,
                   token_values)


@triton.jit
def _counted(x, m, bad):
    """x at counted tokens, 0 elsewhere, NaN at non-finite ones."""
    return tl.where(bad, float("nan"), tl.where(m, x, 0.0))


@triton.jit
def _add_extra(e, x, m, bad, TOKEN_TERM: tl.constexpr):
    """e plus a tile's counted x: a per-token term (TOKEN_TERM) is NaN at non-finite tokens, a
    row value of the γ rule (γ± of the sign family, is_reshape_var's γ_base) is NaN only through
    its row's statistics (metrics.py)."""
    if TOKEN_TERM:
        t = _counted(x, m, bad)
    else:
        t = tl.where(m, x, 0.0)
    return e + t


@triton.jit
def _store_element(ptr, element):
    """A row-sum element (count, Σ m·L, Σ m·k, row, flags) at ptr (``layout.E_*``)."""
    n, loss, kl, row, flags = element
    tl.store(ptr + E_COUNT, n)
    tl.store(ptr + E_LOSS, loss)
    tl.store(ptr + E_KL, kl)
    tl.store(ptr + E_ROW, row.to(ptr.dtype.element_ty))
    tl.store(ptr + E_FLAGS, flags.to(ptr.dtype.element_ty))


@triton.jit
def _given_context(ptr, ACC: tl.constexpr, SELECT: tl.constexpr):
    """The context given on the device at ptr: (c0, c1), and with a token selection (``SELECT``)
    its k-th (key, position) (``selection.py``)."""
    ctx = (tl.load(ptr).to(ACC), tl.load(ptr + 1).to(ACC))
    if SELECT is not None:
        ctx = (ctx[0], ctx[1], tl.load(ptr + 2).to(ACC), tl.load(ptr + 3).to(ACC), tl.load(ptr + 4).to(ACC))
    return ctx


@triton.jit
def _selected(ell, w, A, lp, olp, ctx, params, offs, SELECT: tl.constexpr):
    """The family's context for ``TOKEN`` with its token selection: (c0, c1, selected), selected the
    tokens whose (key, position) precede the k-th one's, (key, eligible) from the family's
    ``SELECT`` (``selection.py``); the position is the flat token index."""
    c0, c1, tau_key, tau_hi, tau_lo = ctx
    pos = offs.to(tl.int64)
    key, eligible = SELECT(ell, w, A, lp, olp, (c0, c1), params, pos)
    last = tau_hi.to(tl.int64) * POSITION_SPLIT + tau_lo.to(tl.int64)
    selected = eligible & ((key < tau_key) | ((key == tau_key) & (pos <= last)))
    return c0, c1, selected


@triton.jit
def _batch_context(stats_ptr, n_stats, gamma_ptr, gamma_rule, scratch_ptr, GROUPS: tl.constexpr,
                   GAMMA_MODE: tl.constexpr, BATCH_STATS: tl.constexpr, ACC: tl.constexpr, KS: tl.constexpr,
                   G: tl.constexpr, BLOCK_REC: tl.constexpr, WARPS: tl.constexpr, SELECT: tl.constexpr):
    """The batch context, identical in every program (same records, same order): the context
    given on the device (PSIS's γ, a token selection's), or ``gamma.family_context`` of pass 1's
    program records (with its groups and frame)."""
    if GAMMA_MODE == GAMMA_GIVEN:
        zero = tl.zeros([], ACC)
        ctx = _given_context(gamma_ptr, ACC, SELECT)
        groups = (zero, zero, zero, zero)
        frame = (zero, zero, zero)
    else:
        ctx, groups, frame = family_context(stats_ptr, n_stats, 0, 0, 1, gamma_rule, scratch_ptr, GROUPS, GAMMA_MODE,
                                            BATCH_STATS, BATCH_STATS, KS, G, BLOCK_REC, WARPS)
    return ctx, groups, frame


@triton.jit
def _lanes_init(like, FRAMED: tl.constexpr):
    """The program's lane accumulators (``_accumulate``), empty."""
    return (like, like, power_sums_init(like, FRAMED), moments_init(like), moments_init(like), like, like, like, like,
            expsum_init(like), expsum_init(like), expsum_init(like), like, like + float("inf"), like,
            (like, like, like, like, like), like, (like, like, like, like, like))


@triton.jit
def _token_loss(ell, w, A, lp, olp, m, bad, r, kl_x, ctx, params, kl_coef, TOKEN: tl.constexpr,
                OPT: tl.constexpr, ROLLOUT_PER_TOKEN: tl.constexpr, KL_TYPE: tl.constexpr):
    """The family's φ, γ_t and extras (``TOKEN``), and per counted token L_t = −F_t·r_t + β·k_t,
    ∂L_t/∂lp_t = −φ_t·r_t + β·k'_t and k_t (0 elsewhere); a non-finite input poisons its
    token's φ, L and extras, whatever the formula. ∂L_t/∂lp_t is +0.0 exactly at masked tokens
    and −0.0 where a counted token's is 0: the backward keeps the first 0 whatever the scale
    and gives the second the scale's NaN (a bad count reaches every counted token, SPEC §11)."""
    phi, F, g, x = TOKEN(ell, w, A, lp, olp, ctx, params, OPT)
    phi = tl.where(bad, float("nan"), tl.where(m, phi, 0.0))
    L = tl.where(bad, float("nan"), tl.where(m, -F, 0.0))
    dL = -phi
    if ROLLOUT_PER_TOKEN:
        L = L * r
        dL = dL * r
    k = tl.zeros_like(ell)
    if KL_TYPE != KL_NONE:
        k, dk = kl_penalty(kl_x, w, KL_TYPE)
        k = tl.where(m, k, 0.0)
        L += kl_coef * k
        dL += tl.where(m, kl_coef * dk, 0.0)
    dL = tl.where(m, tl.where(dL == 0.0, -0.0, dL), 0.0)
    return phi, g, x, L, dL, k


@triton.jit
def _row_add(row_sums, L, k, m, HAS_KL: tl.constexpr):
    """The piece's lane sums (m·L, m·k, m) plus a tile's."""
    row_loss, row_kl, row_n = row_sums
    if HAS_KL:
        row_kl += k
    return row_loss + L, row_kl, row_n + tl.where(m, 1.0, 0.0)


@triton.jit
def _rollout_add(sums, r, m, m0_x, corr, CORRECTION: tl.constexpr):
    """The rollout correction's lane sums plus a tile's: Σ m₀·r, Σ m₀·[ρ > hi], Σ m₀·[ρ < lo]
    (the weight's bounds, lo of the metric; a sequence ratio's rows are counted per piece,
    ``_rollout_rows_add``), the rejected tokens m₀ ∧ ¬m and Σ m₀·x."""
    m0, x, rho = m0_x
    _, w_hi, low, _, _ = corr
    r_sum, high, below, rejected, x_sum = sums
    if not sequence_weight(CORRECTION):
        high += tl.where(m0 & (rho > w_hi), 1.0, 0.0)
        below += tl.where(m0 & (rho < low), 1.0, 0.0)
    return (r_sum + tl.where(m0, r, 0.0), high, below, rejected + tl.where(m0 & ~m, 1.0, 0.0),
            x_sum + tl.where(m0, x, 0.0))


@triton.jit
def _rollout_rows_add(rows, rho_b, first_piece, corr):
    """A sequence ratio's rows above and below the fraction bounds plus row b's [ρ_b > hi] and
    [ρ_b < lo], at the row's first piece (each row once)."""
    _, w_hi, low, _, _ = corr
    high, below = rows
    return (high + tl.where(first_piece & (rho_b > w_hi), 1.0, 0.0),
            below + tl.where(first_piece & (rho_b < low), 1.0, 0.0))


@triton.jit
def _row_rollout(corr_ptr, s, start, end, a, b, chunk, n_chunks, clamp, corr, ACC: tl.constexpr,
                 CORR_ROWS: tl.constexpr, CORRECTION: tl.constexpr, BLOCK_REC: tl.constexpr):
    """(r_b, keep_b, ρ_b) of row s from pass 1's correction records (one for a complete row, else
    the tail of its first chunk and the heads of the others); (1, True, 1) without a row quantity."""
    if CORR_ROWS:
        complete = (start >= a) & (end <= b)
        first, count = row_elements(0, start, end, chunk)
        first = tl.where(complete, 2 * n_chunks + s, first)
        count = tl.where(complete, 1, count)
        return row_correction(corr_ptr, count, first, 2 * (start // chunk), 2, clamp, corr, CORRECTION, CORR_WIDTH,
                              BLOCK_REC)
    else:
        one = tl.full([], 1.0, ACC)
        return one, tl.full([], 1, tl.int1), one


@triton.jit
def _accumulate(acc, ell, w, A, m, bad, phi, g, x, L, k, r, m0_x, corr, frame, FRAMED: tl.constexpr,
                OWN_GROUPS: tl.constexpr, SIGN_GROUPS: tl.constexpr, GAMMA_STATS: tl.constexpr, HAS_KL: tl.constexpr,
                TOKEN_EXTRAS: tl.constexpr, CORRECTION: tl.constexpr):
    """The lane accumulators plus a tile's counted tokens: Σ m·L, Σ m·k, the moments of ℓ (in the
    batch frame if FRAMED; of the A>0 / A<0 groups if OWN_GROUPS), Σ and max of w and |φ|, the
    shifted exp sums of γ_t·ℓ (per sign group if SIGN_GROUPS), Σ, min, max of γ_t (GAMMA_STATS),
    the family's extras (the first TOKEN_EXTRAS per-token terms, then row values), the
    non-finite tokens and the rollout correction's sums (CORRECTION ≠ 0, ``_rollout_add``)."""
    loss_acc, kl_acc, moments, pos, neg, w_sum, w_max, phi_sum, phi_max, ess_all, ess_pos, ess_neg, \
        g_sum, g_min, g_max, extras, nonfinite, rollout_sums = acc
    if HAS_KL:
        kl_acc += k
    loss_acc += L
    moments = power_sums_add(moments, ell, m, frame, FRAMED)
    if OWN_GROUPS:
        pos = moments_add(pos, ell, m & (A > 0.0))
        neg = moments_add(neg, ell, m & (A < 0.0))
    if SIGN_GROUPS:
        ess_pos = expsum_add(ess_pos, g * ell, m & (A > 0.0))
        ess_neg = expsum_add(ess_neg, g * ell, m & (A < 0.0))
    w_sum += tl.where(m, w, 0.0)
    w_max = max_nan(w_max, tl.where(m, w, 0.0))
    phi_sum += phi
    phi_max = max_nan(phi_max, tl.abs(phi))
    ess_all = expsum_add(ess_all, g * ell, m)
    if GAMMA_STATS:
        g_sum += tl.where(m, g, 0.0)
        g_min = tl.where(m, min_nan(g_min, g), g_min)
        g_max = tl.where(m, max_nan(g_max, g), g_max)
    x0, x1, x2, x3, x4 = x
    e0, e1, e2, e3, e4 = extras
    extras = (_add_extra(e0, x0, m, bad, TOKEN_EXTRAS > 0), _add_extra(e1, x1, m, bad, TOKEN_EXTRAS > 1),
              _add_extra(e2, x2, m, bad, TOKEN_EXTRAS > 2), _add_extra(e3, x3, m, bad, TOKEN_EXTRAS > 3),
              _add_extra(e4, x4, m, bad, TOKEN_EXTRAS > 4))
    nonfinite += tl.where(bad, 1.0, 0.0)
    if CORRECTION != 0:
        rollout_sums = _rollout_add(rollout_sums, r, m, m0_x, corr, CORRECTION)
    return (loss_acc, kl_acc, moments, pos, neg, w_sum, w_max, phi_sum, phi_max, ess_all, ess_pos, ess_neg,
            g_sum, g_min, g_max, extras, nonfinite, rollout_sums)


@triton.jit
def _finish_piece(row_sums, seq, head, tail, s, start, end, a, b, row_count_ptr):
    """A piece's row sums (seq-* modes): a complete row adds (Σ m·L)/n_b, (Σ m·k)/n_b and a
    non-empty row to ``seq`` and writes n_b; the piece of a row that starts before chunk [a, b)
    is its head element, of one that ends after it its tail element (``layout.E_*``)."""
    row_loss, row_kl, row_n = row_sums
    seq_loss, seq_kl, seq_rows = seq
    n_b = tl.sum(row_n)
    l_b = tl.sum(row_loss)
    kl_b = tl.sum(row_kl)
    complete = (start >= a) & (end <= b)
    seq_loss += tl.where(complete, safe_div(l_b, n_b), 0.0)
    seq_kl += tl.where(complete, safe_div(kl_b, n_b), 0.0)
    seq_rows += tl.where(complete & (n_b > 0.0), 1.0, 0.0)
    tl.store(row_count_ptr + s, n_b, mask=complete)
    h_n, h_loss, h_kl, h_row, h_flags = head
    is_head = start < a
    head = (tl.where(is_head, n_b, h_n), tl.where(is_head, l_b, h_loss), tl.where(is_head, kl_b, h_kl),
            tl.where(is_head, s, h_row), tl.where(is_head, tl.where(end <= b, ROW_ENDS, 0), h_flags))
    t_n, t_loss, t_kl, t_row, t_flags = tail
    is_tail = (start >= a) & (end > b)
    tail = (tl.where(is_tail, n_b, t_n), tl.where(is_tail, l_b, t_loss), tl.where(is_tail, kl_b, t_kl),
            tl.where(is_tail, s, t_row), tl.where(is_tail, ROW_STARTS, t_flags))
    return (seq_loss, seq_kl, seq_rows), head, tail


@triton.jit
def _partial_record(acc, seq, rollout_rows, lanes, FRAMED: tl.constexpr):
    """The program's partial record (``layout.PARTIAL_FIELDS``) of its lane accumulators, by
    field (the row sums of the seq-* modes and a sequence ratio's row counts on lane 0)."""
    loss_acc, kl_acc, moments, pos, neg, w_sum, w_max, phi_sum, phi_max, ess_all, ess_pos, ess_neg, \
        g_sum, g_min, g_max, extras, nonfinite, rollout_sums = acc
    seq_loss, seq_kl, seq_rows = seq
    n, mean, m2, m3, m4 = power_sums_moments(moments, FRAMED)
    first = lanes == 0
    unset = tl.full(loss_acc.shape, float("nan"), loss_acc.dtype)  # a slot no field writes: loud
    r = ()
    for k in tl.static_range(PARTIAL_WIDTH):
        r = r + (unset,)
    r = put(r, P_N_ALL, (n, mean))
    r = put(r, P_N_POS, (pos[0], pos[1]))
    r = put(r, P_N_NEG, (neg[0], neg[1]))
    r = put(r, P_SEQ_LOSS, (tl.where(first, seq_loss, 0.0),))
    r = put(r, P_SEQ_KL, (tl.where(first, seq_kl, 0.0),))
    r = put(r, P_W_MAX, (w_max,))
    r = put(r, P_PHI_MAX, (phi_max,))
    r = put(r, P_G_MAX, (g_max,))
    r = put(r, P_NEG_G_MIN, (-g_min,))
    r = put(r, P_Z_ALL, (ess_all[0],))
    r = put(r, P_Z_POS, (ess_pos[0],))
    r = put(r, P_Z_NEG, (ess_neg[0],))
    r = put(r, P_M2, (m2, m3, m4))
    r = put(r, P_M2_POS, (pos[2],))
    r = put(r, P_M2_NEG, (neg[2],))
    r = put(r, P_ESS, (ess_all[1], ess_all[2]))
    r = put(r, P_ESS_POS, (ess_pos[1], ess_pos[2]))
    r = put(r, P_ESS_NEG, (ess_neg[1], ess_neg[2]))
    r = put(r, P_LOSS, (loss_acc,))
    r = put(r, P_KL, (kl_acc,))
    r = put(r, P_W, (w_sum,))
    r = put(r, P_PHI, (phi_sum,))
    r = put(r, P_GAMMA, (g_sum,))
    r = put(r, P_EXTRAS, extras)
    r = put(r, P_NONFINITE, (nonfinite,))
    r_sum, high, below, rejected, x_sum = rollout_sums
    r = put(r, P_ROLLOUT, (r_sum, high + tl.where(first, rollout_rows[0], 0.0),
                           below + tl.where(first, rollout_rows[1], 0.0), rejected, x_sum))
    return put(r, P_ROWS, (tl.where(first, seq_rows, 0.0),))


@triton.jit
def _row_context(stats_ptr, gamma_ptr, gamma_row_stride, s, start, end, a, b, chunk, n_chunks,
                 clamp, gamma_rule, params, batch_ctx,
                 ROW_WEIGHT: tl.constexpr, GROUPS: tl.constexpr, GAMMA_MODE: tl.constexpr, ROW_STATS: tl.constexpr,
                 ACC: tl.constexpr, KS: tl.constexpr, G: tl.constexpr, BLOCK_REC: tl.constexpr,
                 SELECT: tl.constexpr):
    """The family context of row s: the batch context, the given context of the row (PSIS's γ, a
    token selection's), or merged from the row's piece records (one for a complete row, else the
    tail of its first chunk and the heads of the others): the family's ``ROW_WEIGHT`` of the row's
    sums (``gamma.merge_sequence_sums``), or its γ rule on the row's groups."""
    ctx = batch_ctx
    if GAMMA_MODE == GAMMA_GIVEN:
        ctx = _given_context(gamma_ptr + s.to(tl.int64) * gamma_row_stride, ACC, SELECT)
    elif ROW_STATS:
        complete = (start >= a) & (end <= b)
        first, count = row_elements(0, start, end, chunk)
        first = tl.where(complete, 2 * n_chunks + s, first)
        count = tl.where(complete, 1, count)
        base = 2 * (start // chunk)
        if ROW_WEIGHT is not None:
            ctx = ROW_WEIGHT(merge_sequence_sums(stats_ptr, count, first, base, 2, KS, BLOCK_REC), clamp, params)
        else:
            ctx, _, _ = family_context(stats_ptr, count, first, base, 2, gamma_rule, stats_ptr,
                                       GROUPS, GAMMA_MODE, True, False, KS, G, BLOCK_REC, 0)
    return ctx


@triton.jit(do_not_specialize=["N", "T", "S", "chunk", "n_chunks", "n_stats", "s_lp_r", "s_lp_t",
                               "s_olp_r", "s_olp_t", "s_adv_r", "s_adv_t", "s_mask_r", "s_mask_t",
                               "s_rollout_r", "s_rollout_t", "s_ref_r", "s_ref_t", "agg_mode"])
def token_loss_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, rollout_ptr, ref_ptr, cu_ptr, stats_ptr, n_stats, corr_ptr,
    gamma_ptr, gamma_row_stride,
    neg_phi_ptr, element_ptr, row_count_ptr, partial_ptr, partial_stride, ticket_ptr,
    loss_ptr, metrics_ptr, grad_scale_ptr,
    N, T, S, chunk, n_chunks,
    s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r, s_mask_t,
    s_rollout_r, s_rollout_t, s_ref_r, s_ref_t,
    clamp, gamma_rule, params, corr, kl_coef, agg_mode,
    dp_size, global_token_count, global_batch_size, loss_scale_factor,
    TOKEN: tl.constexpr, OPT: tl.constexpr, ROW_WEIGHT: tl.constexpr, ROLLOUT_IN_ROW: tl.constexpr,
    GROUPS: tl.constexpr, SELECT: tl.constexpr,
    GAMMA_STATS: tl.constexpr, TOKEN_EXTRAS: tl.constexpr, GAMMA_MODE: tl.constexpr, KL_TYPE: tl.constexpr,
    BATCH_STATS: tl.constexpr, ROW_STATS: tl.constexpr, SIGN_GROUPS: tl.constexpr,
    ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
    CORRECTION: tl.constexpr,
    PACKED: tl.constexpr, UNIT_STRIDE: tl.constexpr, WRITE_GRAD: tl.constexpr, SEQ_AGG: tl.constexpr,
    SEQ_GAMMA: tl.constexpr, COUNTS_ON_DEVICE: tl.constexpr, SLOTS: tl.constexpr, WARPS: tl.constexpr,
    KS: tl.constexpr, G: tl.constexpr, BLOCK_REC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Loss, metrics and ∂L/∂lp per token (see module docstring); ``agg_mode`` is the
    aggregation's index in ``AGG_MODES`` (SEQ_AGG: one of the seq-* modes). With rollout IS weights r
    and the KL term, L_t = −F_t·r_t + β·k(x_t) and ∂L_t/∂lp_t = −φ_t·r_t + β·k'(x_t)
    (ROLLOUT_IN_ROW, a family whose row weight takes r: r is in it, not per token); ``kl_coef`` = β.
    CORRECTION ≠ 0: the rollout stream holds log π_rollout, of which the rollout correction
    (``rollout.py``, floats ``corr``) makes r and the tokens it rejects; a row quantity's from
    pass 1's records at corr_ptr.
    The family: its device function ``TOKEN`` with its option OPT and float tuple ``params``, its
    ``ROW_WEIGHT`` (or None), the groups of its γ rule ``gamma_rule`` (``gamma.py``: GROUPS,
    GAMMA_MODE), its token selection's ``SELECT`` (or None), whether it reports γ_t statistics
    (GAMMA_STATS) and how many of its extras are per-token terms (TOKEN_EXTRAS, ``_accumulate``);
    global_* < 0 means "not given" (or device tensors, see ``finalize``); SLOTS: the partial slots
    filled (``layout.partial_slots``); WARPS: the launch's num_warps."""
    lp, olp, adv, mask, rollout, ref = streams(lp_ptr, olp_ptr, adv_ptr, mask_ptr, rollout_ptr, ref_ptr,
                                               s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r,
                                               s_mask_t, s_rollout_r, s_rollout_t, s_ref_r, s_ref_t, UNIT_STRIDE,
                                               PACKED)
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_T)
    like = tl.zeros([BLOCK_T], ACC)
    zero = tl.zeros([], ACC)
    # the program's row of the partial buffer (``partial_stride`` = layout.partial_row(WARPS) values):
    # its record, then the scratch of its merges across warps (the lanes' record, the batch context)
    partial_row = partial_ptr + pid.to(tl.int64) * partial_stride
    record_scratch = partial_row + PARTIAL_SCRATCH
    # with batch statistics the sign family's A>0 / A<0 moments of ℓ come from them (pass 1
    # counted the same tokens), else from this pass (OWN_GROUPS), and the moments of ℓ are power
    # sums in the batch frame (FRAMED: ``common.power_sums_add``)
    OWN_GROUPS: tl.constexpr = SIGN_GROUPS and not BATCH_STATS
    FRAMED: tl.constexpr = BATCH_STATS
    CORR_ROWS: tl.constexpr = HAS_ROLLOUT and per_row(CORRECTION)
    batch_ctx, groups, frame = _batch_context(stats_ptr, n_stats, gamma_ptr, gamma_rule,
                                              record_scratch + PARTIAL_WIDTH * WARPS, GROUPS, GAMMA_MODE,
                                              BATCH_STATS, ACC, KS, G, BLOCK_REC, WARPS, SELECT)
    acc = _lanes_init(like, FRAMED)  # the program's lane accumulators
    seq = (zero, zero, zero)  # complete rows of the seq-* modes: Σ (row loss)/n_b, Σ (row KL)/n_b, rows n_b > 0
    rollout_rows = (zero, zero)  # a sequence ratio's rows above / below the fraction metrics' bounds
    for c in range(pid, n_chunks, tl.num_programs(0)):
        a = c * chunk
        b = tl.minimum(a + chunk, N)
        # the chunk's head and tail elements (neutral unless a piece fills them)
        head = (zero, zero, zero, tl.zeros([], tl.int32), tl.zeros([], tl.int32))
        tail = head
        p = a
        while p < b:
            s, start, end = locate_row(p, cu_ptr, S, T, N, PACKED)
            e = piece_end(p, end, b)
            origin = 0 if PACKED else start
            raw = load_raw(lp, olp, adv, mask, rollout, ref, s, origin, p + lanes, prologue_stop(e, b, PACKED),
                           HAS_ADV, HAS_MASK, HAS_ROLLOUT, KL_TYPE != KL_NONE)  # the piece's first tile
            ctx = _row_context(stats_ptr, gamma_ptr, gamma_row_stride, s, start, end, a, b, chunk,
                               n_chunks, clamp, gamma_rule, params, batch_ctx,
                               ROW_WEIGHT, GROUPS, GAMMA_MODE, ROW_STATS, ACC, KS, G, BLOCK_REC, SELECT)
            r_b, keep_b, rho_b = _row_rollout(corr_ptr, s, start, end, a, b, chunk, n_chunks, clamp, corr, ACC,
                                              CORR_ROWS, CORRECTION, BLOCK_REC)
            if CORR_ROWS and sequence_weight(CORRECTION):
                rollout_rows = _rollout_rows_add(rollout_rows, rho_b, start >= a, corr)
            row_sums = (like, like, like)  # the piece's lane sums of m·L, m·k and m (seq-* modes)
            for t0 in range(p, e, BLOCK_T):
                offs = t0 + lanes
                ahead = load_raw(lp, olp, adv, mask, rollout, ref, s, origin, offs + BLOCK_T, e,
                                 HAS_ADV, HAS_MASK, HAS_ROLLOUT, KL_TYPE != KL_NONE)  # the next tile
                ell, A, m, bad, r, kl_x, m0_x = token_values(raw, offs, e, start, end, clamp, corr, (r_b, keep_b),
                                                             ACC, HAS_ADV, HAS_MASK, HAS_ROLLOUT, KL_TYPE != KL_NONE,
                                                             PACKED, CORRECTION)
                lp_t, olp_t = log_probs(raw, m, ACC)
                raw = ahead
                w = tl.exp(ell)
                token_ctx = ctx
                if SELECT is not None:
                    token_ctx = _selected(ell, w, A, lp_t, olp_t, ctx, params, offs, SELECT)
                phi, g, x, L, dL, k = _token_loss(ell, w, A, lp_t, olp_t, m, bad, r, kl_x, token_ctx, params, kl_coef,
                                                  TOKEN, OPT, HAS_ROLLOUT and not ROLLOUT_IN_ROW, KL_TYPE)
                if WRITE_GRAD:
                    tl.store(neg_phi_ptr + offs, dL, mask=offs < e)
                if SEQ_AGG:
                    row_sums = _row_add(row_sums, L, k, m, KL_TYPE != KL_NONE)
                acc = _accumulate(acc, ell, w, A, m, bad, phi, g, x, L, k, r, m0_x, corr, frame, FRAMED,
                                  OWN_GROUPS, SIGN_GROUPS, GAMMA_STATS, KL_TYPE != KL_NONE, TOKEN_EXTRAS, CORRECTION)
            if SEQ_AGG:  # the piece's row sums: a complete row now, else a head / tail element
                seq, head, tail = _finish_piece(row_sums, seq, head, tail, s, start, end, a, b, row_count_ptr)
            p = e
        if SEQ_AGG:
            _store_element(element_ptr + tl.cast(2 * c, tl.int64) * ELEMENT_WIDTH, head)
            _store_element(element_ptr + tl.cast(2 * c + 1, tl.int64) * ELEMENT_WIDTH, tail)

    # the program's partial record, merged over its lanes
    record = _partial_record(acc, seq, rollout_rows, lanes, FRAMED)
    store_record(partial_row, reduce_record(record, record_scratch, SLOTS, WARPS, FRAMED), SLOTS)

    # completion ticket: the last program to arrive merges every partial
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        finalize(partial_ptr, partial_stride, tl.num_programs(0), element_ptr, 2 * n_chunks, row_count_ptr, cu_ptr,
                 loss_ptr, metrics_ptr, grad_scale_ptr, record_scratch, (batch_ctx[0], batch_ctx[1]), groups, frame,
                 S, T,
                 dp_size, global_token_count, global_batch_size, loss_scale_factor,
                 agg_mode, SEQ_AGG, SEQ_GAMMA, PACKED, COUNTS_ON_DEVICE, SIGN_GROUPS and not OWN_GROUPS, FRAMED, SLOTS,
                 CORR_ROWS and sequence_weight(CORRECTION), WARPS, BLOCK_P, BLOCK_E)
        tl.store(ticket_ptr, 0)
