"""Work items: chunks of tokens, the rows (sequences) inside them, and tile loads.

Tokens are numbered 0..N−1 in a virtual order: row-major for the padded layout
(row s holds tokens s·T … s·T+T−1) and storage order for the packed layout (row
s holds tokens cu[s] … cu[s+1]−1). A work item is a chunk of ``chunk``
consecutive tokens; a chunk is cut at row boundaries into *pieces*, each in one
row. A piece is *complete* when its row starts and ends inside the chunk, a
*head* when it continues a row from an earlier chunk (always the chunk's first
piece) and a *tail* when its row starts in the chunk and goes on after it
(always the last piece). Per-row quantities of a row that spans chunks are
merged from the tail record of its first chunk and the head records of the
others, in order: element 2c of a chunk record array is chunk c's head, 2c+1
its tail (``row_elements``).

Malformed ``cu_seqlens`` never cause an out-of-bounds access: token addresses
come from the chunk grid over N, row indices from a search that stays inside
[0, S), the offsets read are clamped into [0, N] (``locate_row``) before they
index a record, and tokens outside their row's bounds are not counted.
"""
import triton
import triton.language as tl

from .common import finite_or_nan
from .rollout import token_correction


SEARCH_PROBES = tl.constexpr(32)  # cu_seqlens values per search step: one warp's lanes, one L2 round trip


@triton.jit
def _search_step(lo, hi, p, cu_ptr, S):
    """One step of the search for the largest s in [lo, hi) with cu[s] <= p: the range is cut
    into 31 slices whose starts, and the start after the last, are read by one vector load (the
    count reduces inside each warp: no CTA barrier). Returns the slice holding s and, once it is
    one row (the step was 1), that row's cu[s] and cu[s + 1] from the same load."""
    step = (hi - lo + SEARCH_PROBES - 2) // (SEARCH_PROBES - 1)
    k = tl.arange(0, SEARCH_PROBES)
    probe = lo + k * step
    cu = tl.load(cu_ptr + probe, mask=probe <= S, other=0)
    cu = tl.minimum(tl.maximum(cu, -1), 2147483647).to(tl.int32)  # int64 offsets past int32 saturate
    count = tl.sum(((k < SEARCH_PROBES - 1) & (probe < hi) & (cu <= p)).to(tl.int32))
    j = tl.maximum(count - 1, 0)  # ≥ 0 even for a malformed cu
    start = tl.sum(tl.where(k == j, cu, 0))
    end = tl.sum(tl.where(k == j + 1, cu, 0))
    lo = lo + j * step
    return lo, tl.minimum(lo + step, hi), start, end


@triton.jit
def locate_row(p, cu_ptr, S, T, N, PACKED: tl.constexpr):
    """(s, start, end): the row holding token p and its token range [start, end). Packed: the
    largest s in [0, S) with cu[s] <= p (empty rows are skipped), by 31-way steps (one for
    S ≤ 31, two for S ≤ 961, …); every probe stays inside cu[0..S] (S ≥ 1: the host rejects
    S = 0 with N > 0). The offsets read are clamped before any use as an address or a record
    index: start into [0, p], end into [start, N] (no-ops for valid offsets, whose search gives
    cu[s] ≤ p < cu[s + 1] ≤ N), so malformed ones (negative, decreasing, past N) cannot move an
    access out of its buffer (SPEC §2)."""
    if PACKED:
        lo, hi, start, end = _search_step(tl.zeros([], tl.int32), S, p, cu_ptr, S)
        while hi - lo > 1:
            lo, hi, start, end = _search_step(lo, hi, p, cu_ptr, S)
        start = tl.minimum(tl.maximum(start, 0), p)
        end = tl.minimum(tl.maximum(end, start), N)
        return lo, start, end
    else:
        s = p // T
        return s, s * T, s * T + T


@triton.jit
def piece_end(p, end, chunk_end):
    """End of the piece starting at p: its row's end, inside the chunk, at least p + 1."""
    return tl.minimum(tl.maximum(end, p + 1), chunk_end)


@triton.jit
def prologue_stop(piece_stop, chunk_stop, PACKED: tl.constexpr):
    """Bound of the loads of a piece's first tile: packed, the chunk's end, so that they do not
    wait for the row search (the tokens past the piece are in bounds, and ``token_values``
    masks them out); padded, the piece's end."""
    if PACKED:
        return chunk_stop
    else:
        return piece_stop


@triton.jit
def row_elements(j, start, end, chunk):
    """Record element of the j-th chunk of a row spanning chunks: the tail of its first
    chunk (j = 0), then the heads of the following ones; and the number of chunks."""
    c_lo = start // chunk
    n_chunks = (end - 1) // chunk - c_lo + 1
    return tl.where(j == 0, 2 * c_lo + 1, 2 * (c_lo + j)), n_chunks


@triton.jit
def streams(lp_ptr, olp_ptr, adv_ptr, mask_ptr, rollout_ptr, ref_ptr,
            s_lp_r, s_lp_t, s_olp_r, s_olp_t, s_adv_r, s_adv_t, s_mask_r, s_mask_t,
            s_rollout_r, s_rollout_t, s_ref_r, s_ref_t, UNIT_STRIDE: tl.constexpr, PACKED: tl.constexpr):
    """The six token streams of a kernel as (pointer, row stride, token stride) tuples, in
    ``load_raw``'s order: log_prob, old_log_prob, advantages, mask, rollout IS weights, ref log_prob.
    UNIT_STRIDE: every stream read has token stride 1, a constant here, so a token's address is
    its row's plus the token index (no 64-bit multiply per element); packed, the streams are
    then 1-D (row stride 0, a constant too): addresses do not wait for the row search."""
    if UNIT_STRIDE and PACKED:
        return ((lp_ptr, 0, 1), (olp_ptr, 0, 1), (adv_ptr, 0, 1), (mask_ptr, 0, 1), (rollout_ptr, 0, 1),
                (ref_ptr, 0, 1))
    elif UNIT_STRIDE:
        return ((lp_ptr, s_lp_r, 1), (olp_ptr, s_olp_r, 1), (adv_ptr, s_adv_r, 1), (mask_ptr, s_mask_r, 1),
                (rollout_ptr, s_rollout_r, 1), (ref_ptr, s_ref_r, 1))
    else:
        return ((lp_ptr, s_lp_r, s_lp_t), (olp_ptr, s_olp_r, s_olp_t), (adv_ptr, s_adv_r, s_adv_t),
                (mask_ptr, s_mask_r, s_mask_t), (rollout_ptr, s_rollout_r, s_rollout_t),
                (ref_ptr, s_ref_r, s_ref_t))


@triton.jit
def _address(stream, s, tok):
    ptr, row_stride, tok_stride = stream
    return ptr + s.to(tl.int64) * row_stride + tok.to(tl.int64) * tok_stride


@triton.jit
def load_raw(lp, olp, adv, mask, rollout, ref, s, origin, offs, piece_stop,
             HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
             HAS_REF: tl.constexpr):
    """The loads of one tile of row s, as stored and with no arithmetic on them, so a token
    loop can issue the next tile's loads before it computes on this one (DRAM latency then
    overlaps compute). Every stream is (pointer, row stride, token stride); token t of row s
    lives at s·row_stride + (t − origin)·token_stride. Loads are predicated on bounds only
    (a tile past the piece loads nothing); absent streams repeat log_prob's tile unused."""
    inb = offs < piece_stop
    tok = offs - origin
    lp_v = tl.load(_address(lp, s, tok), mask=inb, other=0.0)
    olp_v = tl.load(_address(olp, s, tok), mask=inb, other=0.0)
    adv_v = tl.load(_address(adv, s, tok), mask=inb, other=0.0) if HAS_ADV else lp_v
    mask_v = tl.load(_address(mask, s, tok), mask=inb, other=0) if HAS_MASK else lp_v
    r_v = tl.load(_address(rollout, s, tok), mask=inb, other=1.0) if HAS_ROLLOUT else lp_v
    ref_v = tl.load(_address(ref, s, tok), mask=inb, other=0.0) if HAS_REF else lp_v
    return lp_v, olp_v, adv_v, mask_v, r_v, ref_v


@triton.jit
def token_values(raw, offs, piece_stop, start, end, clamp, corr, row_corr,
                 ACC: tl.constexpr, HAS_ADV: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_ROLLOUT: tl.constexpr, HAS_REF: tl.constexpr, PACKED: tl.constexpr,
                 CORRECTION: tl.constexpr):
    """ℓ, A, the count mask m, the non-finite flag of counted tokens, the rollout IS weight r
    (1 when absent), x = lp − ref_lp of the KL term (0 when absent) and (m₀, x_r, ρ): the count
    mask before the rollout correction's rejection, its log-ratio and ratio (CORRECTION ≠ 0).

    The mask selects, so masked NaN/inf never leak (ℓ = A = x = 0, r = 1 there). At counted
    tokens ℓ = clamp(lp − olp, ±clamp); a non-finite lp − olp gives ℓ = NaN and a non-finite
    A, r (its own: a row's weight poisons without flagging) or x is read as NaN, each flagged in
    ``bad`` (SPEC §11). The rollout stream holds r (CORRECTION = 0) or log π_rollout, of which
    ``rollout.token_correction`` makes r and the rejection (``corr``: its floats; ``row_corr``: the
    row's weight and rejection). Inputs are upcast to ACC first (no bf16/fp16 arithmetic).
    """
    lp_v, olp_v, adv_v, mask_v, r_v, ref_v = raw
    m = offs < piece_stop
    if PACKED:
        m = m & (offs >= start) & (offs < end)
    if HAS_MASK:
        m = m & (mask_v != 0)
    log_p = lp_v.to(ACC)
    d = finite_or_nan(log_p - olp_v.to(ACC))
    m0 = m
    one = tl.where(m, 1.0, 1.0).to(ACC)
    r = one
    x_r = one
    rho = one
    r_bad = tl.zeros(m.shape, tl.int1)  # the token's own rollout input is not finite
    if HAS_ROLLOUT:
        if CORRECTION == 0:
            r = finite_or_nan(r_v.to(ACC))
            r_bad = r != r
        else:
            r, kept, x_r, rho = token_correction(log_p, olp_v.to(ACC), r_v.to(ACC), m0, row_corr, clamp, corr,
                                                 CORRECTION)
            m = m & kept
            r_bad = x_r != x_r
            rho = tl.where(m0, rho, 1.0)
        r = tl.where(m0, r, 1.0)
    bad = m & ((d != d) | r_bad)
    ell = tl.where(m, tl.where(d < -clamp, -clamp, tl.where(d > clamp, clamp, d)), 0.0)
    if HAS_ADV:
        a = finite_or_nan(adv_v.to(ACC))
        bad = bad | (m & (a != a))
        a = tl.where(m, a, 0.0)
    else:
        a = tl.where(m, 1.0, 0.0).to(ACC)
    x = tl.zeros_like(ell)
    if HAS_REF:
        x = finite_or_nan(log_p - ref_v.to(ACC))
        bad = bad | (m & (x != x))
        x = tl.where(m, x, 0.0)
    return ell, a, m, bad, r, x, (m0, x_r, rho)


@triton.jit
def log_probs(raw, m, ACC: tl.constexpr):
    """The log-probs (lp, olp) of a tile's raw loads at counted tokens, 0 elsewhere (upcast to ACC)."""
    lp_v, olp_v, _, _, _, _ = raw
    return tl.where(m, lp_v.to(ACC), 0.0), tl.where(m, olp_v.to(ACC), 0.0)
