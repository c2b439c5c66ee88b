"""From logits (SPEC §8): a fused selective log-softmax over the vocabulary, with
entropy, in one pass over V per token; and the gradient w.r.t. the logits in one
more pass.

Reduction order (a function of V alone, so that a token's bits never depend on the
batch): V is cut into n_chunks chunks of chunk_tiles BLOCK_V-wide tiles (the host's
``vocab_chunks``); each chunk is reduced to a record, and the records are merged in
chunk order. The launch only decides who reduces which chunk: a program takes
``per_program`` consecutive chunks of one token (all of them once the tokens alone fill
the GPU); with more than one chunk every record goes through memory and the same
merge, whatever the launch.

Per chunk, lane (vector) accumulators over its tiles keep, for each lane j, a
running max m_j, s_j = Σ e^{z−m_j} and q_j = Σ e^{z−m_j}·(z − m_j) (one exp per
element: a new maximum rescales by e^{m_old−z}, any other element adds e^{z−m}).
They are reduced once per chunk to a *record* (M, S, Q, t): M = max,
S = Σ e^{z−M}, Q = Σ e^{z−M}(z − M), t = z[label] if the label's column lies in the
chunk, else 0. Records merge exactly
(w_r = e^{M_r − M}: S = Σ w_r S_r, Q = Σ w_r (Q_r + S_r (M_r − M)), t = Σ t_r), and
    lse = M + log S,  H = log S − Q/S  (= lse − Σ p·z),  log_prob = (t − M) − log S.

Forward modes (``MODE``):
  DIRECT   n_chunks = 1: the program writes log_prob, lse, H itself (no record).
  WALK     per_program = n_chunks: the program writes its token's records, then merges
           them in chunk order and writes the outputs.
  TICKET   per_program < n_chunks: each program writes its records, then takes an
           integer ticket (atomic add); the last of a token's programs merges the
           records as WALK does. No program waits on another, no float atomics, and
           the merge needs no second launch.
  RECORDS  vocabulary-parallel: records only; after an all-gather of the records of
           every rank, ``merge_vocab_records_kernel`` merges them in (rank, chunk)
           order, the same on every rank.

Labels are never used unchecked as an index: the target load is masked by the
label's range and its index selected into range. A counted token whose label is
outside [0, V_total) gets log_prob = NaN (loud, like a non-finite input).
"""
import triton
import triton.language as tl

DIRECT = tl.constexpr(0)
WALK = tl.constexpr(1)
TICKET = tl.constexpr(2)
RECORDS = tl.constexpr(3)
REC_WIDTH = tl.constexpr(4)  # (M, S, Q, t); isreshape_triton.from_logits.REC_WIDTH
NEG_INIT = tl.constexpr(-1.0e38)  # finite start of the running max: no inf − inf
EXP_FLOOR = tl.constexpr(-128.0)  # e^{−128} = 0 in fp32; keeps e·d finite for z = −inf


@triton.jit
def token_ptr(base, n, T_in, s_outer, s_inner):
    """Address of token n of a [outer, T_in, ...] view (strides in elements, int64)."""
    return base + (n // T_in).to(tl.int64) * s_outer + (n % T_in).to(tl.int64) * s_inner


@triton.jit
def vocab_row(base, n, T_in, s_outer, s_inner, ALIGN: tl.constexpr):
    """Token n's logits row; its offset is a multiple of ALIGN elements (the host checks
    the strides), so that the tile loads vectorize."""
    off = (n // T_in).to(tl.int64) * s_outer + (n % T_in).to(tl.int64) * s_inner
    return base + tl.multiple_of(off, ALIGN)


@triton.jit
def work_item(program, n_chunks, per_program):
    """(token, first chunk, end chunk) of a program: ``per_program`` consecutive chunks."""
    progs = tl.cdiv(n_chunks, per_program)
    c_lo = program % progs * per_program
    return program // progs, c_lo, tl.minimum(c_lo + per_program, n_chunks)


@triton.jit
def chunk_columns(c_lo, c_hi, chunk_tiles, V, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """(first column, end column) of chunks [c_lo, c_hi); V is a multiple of ALIGN."""
    return c_lo * chunk_tiles * BLOCK_V, tl.multiple_of(tl.minimum(c_hi * chunk_tiles * BLOCK_V, V), ALIGN)


@triton.jit
def chunk_record(row, lo, hi, inv_temp, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """(M, S, Q) over z = inv_temp·row[lo:hi] from lane accumulators (see module doc)."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], NEG_INIT, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    q = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + offs
        z = tl.load(row + cols, mask=cols < hi, other=float("-inf")).to(tl.float32) * inv_temp
        d = z - m
        new = d > 0.0  # NaN: False, and the NaN reaches s through e
        d = tl.where(d < EXP_FLOOR, EXP_FLOOR, d)
        e = tl.exp(-tl.abs(d))
        if ENTROPY:
            q = tl.where(new, e * (q - s * d), q + e * d)
        s = tl.where(new, e * s + 1.0, s + e)
        m = tl.where(new, z, m)
    M = tl.max(m)
    w = tl.exp(m - M)
    return M, tl.sum(s * w), tl.sum(w * (q + s * (m - M)))


@triton.jit
def target_logit(row, loc, lo, hi, inv_temp):
    """z at local column ``loc`` if it lies in [lo, hi), else 0 (index selected into range)."""
    owned = (loc >= lo) & (loc < hi)
    t = tl.load(row + tl.where(owned, loc, 0), mask=owned, other=0.0)
    return tl.where(owned, t.to(tl.float32) * inv_temp, 0.0)


@triton.jit
def merge_records(rec, n_ranks, rank_stride, n_chunks, BLOCK_R: tl.constexpr):
    """(M, S, Q, t) of one token from its n_ranks × n_chunks records, record (r, c) at
    rec + r·rank_stride + c·REC_WIDTH, merged in (rank, chunk) order."""
    offs = tl.arange(0, BLOCK_R)
    count = n_ranks * n_chunks
    mx = tl.full([BLOCK_R], NEG_INIT, tl.float32)
    for k0 in range(0, count, BLOCK_R):
        k = k0 + offs
        ptr = rec + (k // n_chunks).to(tl.int64) * rank_stride + (k % n_chunks) * REC_WIDTH
        mx = tl.maximum(mx, tl.load(ptr, mask=k < count, other=NEG_INIT, cache_modifier=".cg"))
    M = tl.max(mx)
    s = tl.zeros([BLOCK_R], tl.float32)
    q = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, count, BLOCK_R):
        k = k0 + offs
        live = k < count
        ptr = rec + (k // n_chunks).to(tl.int64) * rank_stride + (k % n_chunks) * REC_WIDTH
        m_r = tl.load(ptr, mask=live, other=NEG_INIT, cache_modifier=".cg")
        s_r = tl.load(ptr + 1, mask=live, other=0.0, cache_modifier=".cg")
        w = tl.exp(m_r - M)
        s += w * s_r
        q += w * (tl.load(ptr + 2, mask=live, other=0.0, cache_modifier=".cg") + s_r * (m_r - M))
        t += tl.load(ptr + 3, mask=live, other=0.0, cache_modifier=".cg")
    return M, tl.sum(s), tl.sum(q), tl.sum(t)


@triton.jit
def store_token(n, M, S, Q, t, label, V_total, lp_ptr, lse_ptr, ent_ptr, ENTROPY: tl.constexpr):
    """log_prob = (t − M) − log S (NaN for a label outside [0, V_total)), lse = M + log S,
    H = log S − Q/S. log_prob as (t − M) − log S rounds at the scale of t − M and log S, as
    torch's log_softmax does, not at that of lse (t − lse loses ~|lse|·2^-24: 2e-6 at z ≈ 30)."""
    log_s = tl.log(S)
    lse = M + log_s
    valid = (label >= 0) & (label < V_total)
    tl.store(lp_ptr + n, tl.where(valid, (t - M) - log_s, float("nan")))
    tl.store(lse_ptr + n, lse)
    if ENTROPY:
        tl.store(ent_ptr + n, log_s - Q / S)


@triton.jit
def merge_token(rec, n, label, V_total, lp_ptr, lse_ptr, ent_ptr, n_chunks, ENTROPY: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """Merge token n's n_chunks records at ``rec`` in chunk order; write its outputs."""
    M, S, Q, t = merge_records(rec, 1, 0, n_chunks, BLOCK_R)
    store_token(n, M, S, Q, t, label, V_total, lp_ptr, lse_ptr, ent_ptr, ENTROPY)


@triton.jit(do_not_specialize=["N", "V", "T_in", "s_outer", "s_inner", "s_lab_outer", "s_lab_inner",
                               "n_chunks", "chunk_tiles", "per_program", "vocab_lo", "V_total"])
def logits_forward_kernel(
    logits_ptr, labels_ptr, rec_ptr, ticket_ptr, lp_ptr, lse_ptr, ent_ptr,
    N, V, T_in, s_outer, s_inner, s_lab_outer, s_lab_inner,
    n_chunks, chunk_tiles, per_program, vocab_lo, V_total, inv_temp,
    MODE: tl.constexpr, ENTROPY: tl.constexpr, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The records of a program's chunks, and log_prob / lse / entropy (see module doc)."""
    n, c_lo, c_hi = work_item(tl.program_id(0), n_chunks, per_program)
    row = vocab_row(logits_ptr, n, T_in, s_outer, s_inner, ALIGN)
    label = tl.load(token_ptr(labels_ptr, n, T_in, s_lab_outer, s_lab_inner))
    rec = rec_ptr + n.to(tl.int64) * n_chunks * REC_WIDTH
    for c in range(c_lo, c_hi):
        lo, hi = chunk_columns(c, c + 1, chunk_tiles, V, ALIGN, BLOCK_V)
        M, S, Q = chunk_record(row, lo, hi, inv_temp, ENTROPY, BLOCK_V)
        t = target_logit(row, label - vocab_lo, lo, hi, inv_temp)
        if MODE == DIRECT:
            store_token(n, M, S, Q, t, label, V_total, lp_ptr, lse_ptr, ent_ptr, ENTROPY)
        else:
            tl.store(rec + c * REC_WIDTH, M)
            tl.store(rec + c * REC_WIDTH + 1, S)
            tl.store(rec + c * REC_WIDTH + 2, Q)
            tl.store(rec + c * REC_WIDTH + 3, t)
    if MODE == WALK:
        tl.debug_barrier()  # every thread's record stores precede the merge's loads
        merge_token(rec, n, label, V_total, lp_ptr, lse_ptr, ent_ptr, n_chunks, ENTROPY, BLOCK_R)
    elif MODE == TICKET:
        tl.debug_barrier()  # every thread's record stores precede the release below
        if tl.atomic_add(ticket_ptr + n, 1, sem="acq_rel") == tl.cdiv(n_chunks, per_program) - 1:
            merge_token(rec, n, label, V_total, lp_ptr, lse_ptr, ent_ptr, n_chunks, ENTROPY, BLOCK_R)


@triton.jit(do_not_specialize=["N", "T_in", "s_lab_outer", "s_lab_inner", "n_ranks", "n_chunks", "V_total"])
def merge_vocab_records_kernel(
    rec_ptr, labels_ptr, lp_ptr, lse_ptr, ent_ptr,
    N, T_in, s_lab_outer, s_lab_inner, n_ranks, n_chunks, V_total,
    ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Vocabulary-parallel: merge the all-gathered [n_ranks, N, n_chunks] records of token
    ``program_id`` in (rank, chunk) order; every rank runs it on the same records."""
    n = tl.program_id(0)
    label = tl.load(token_ptr(labels_ptr, n, T_in, s_lab_outer, s_lab_inner))
    rank_stride = N.to(tl.int64) * n_chunks * REC_WIDTH
    M, S, Q, t = merge_records(rec_ptr + n.to(tl.int64) * n_chunks * REC_WIDTH, n_ranks, rank_stride,
                               n_chunks, BLOCK_R)
    store_token(n, M, S, Q, t, label, V_total, lp_ptr, lse_ptr, ent_ptr, ENTROPY)


@triton.jit(do_not_specialize=["N", "V", "T_in", "s_outer", "s_inner", "g_outer", "g_inner",
                               "s_lab_outer", "s_lab_inner", "s_glp", "s_gent", "n_chunks", "chunk_tiles",
                               "per_program", "vocab_lo"])
def logits_backward_kernel(
    logits_ptr, grad_ptr, labels_ptr, lp_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    N, V, T_in, s_outer, s_inner, g_outer, g_inner, s_lab_outer, s_lab_inner,
    s_glp, s_gent, n_chunks, chunk_tiles, per_program, vocab_lo, inv_temp,
    LP_GRAD: tl.constexpr, ENT_GRAD: tl.constexpr, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """grad_logits = [g·(onehot − p) − g_H·p·(log p + H)]/temperature on a program's chunks,
    log p = z − lse (log p + H = z − Σp·z), at the label's column the forward's log_prob
    (rounded at the scale of log p, not of lse: 1 − p of a peaked row keeps its digits),
    written in the gradient's dtype (the logits' storage itself for an in-place backward).
    A token with g = g_H = 0 (masked) gets exact zeros without reading its logits.
    Elementwise given log_prob, lse and H: the row's bits do not depend on the launch."""
    n, c_lo, c_hi = work_item(tl.program_id(0), n_chunks, per_program)
    lo, hi = chunk_columns(c_lo, c_hi, chunk_tiles, V, ALIGN, BLOCK_V)
    row = vocab_row(logits_ptr, n, T_in, s_outer, s_inner, ALIGN)
    out = vocab_row(grad_ptr, n, T_in, g_outer, g_inner, ALIGN)
    loc = tl.load(token_ptr(labels_ptr, n, T_in, s_lab_outer, s_lab_inner)) - vocab_lo
    lse = tl.load(lse_ptr + n)
    lp = tl.load(lp_ptr + n)
    g = tl.zeros([], tl.float32)
    g_h = tl.zeros([], tl.float32)
    h = tl.zeros([], tl.float32)
    if LP_GRAD:
        g = tl.load(glp_ptr + n.to(tl.int64) * s_glp).to(tl.float32)
    if ENT_GRAD:
        g_h = tl.load(gent_ptr + n.to(tl.int64) * s_gent).to(tl.float32)
        h = tl.load(ent_ptr + n)
    live = (g != 0.0) | (g_h != 0.0)
    hi_read = tl.where(live, hi, lo)  # a dead token's logits are not read: z = 0, and with
    lse = tl.where(live, lse, 0.0)  # finite lse, log_prob and H every term below is exactly 0
    lp = tl.where(live, lp, 0.0)
    h = tl.where(live, h, 0.0)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + offs
        z = tl.load(row + cols, mask=cols < hi_read, other=0.0).to(tl.float32) * inv_temp
        log_p = tl.where(cols == loc, lp, z - lse)
        p = tl.exp(log_p)
        dz = g * (tl.where(cols == loc, 1.0, 0.0) - p)
        if ENT_GRAD:  # p·log p → 0 at a −inf logit
            dz -= g_h * tl.where(p > 0.0, p * (log_p + h), 0.0)
        tl.store(out + cols, (dz * inv_temp).to(grad_ptr.dtype.element_ty), mask=cols < hi)
