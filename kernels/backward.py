"""Backward (one launch): ∂loss/∂log_prob_t = (−m·φ)_t · s · g, with s the gradient
scale of the aggregation (SPEC §2, §5) and g the incoming gradient, both read on the
device; for seq-mean-token-mean s is divided by the token's row count n_b, found
per piece on the same chunked work items as the forward pass (``rows.py``)."""
import triton
import triton.language as tl

from .rows import locate_row, piece_end


@triton.jit
def _masked(x):
    """x is +0.0 (all bits 0): the forward's mark of a masked token (a counted token's 0 is −0.0)."""
    if x.dtype.primitive_bitwidth == 64:
        bits = x.to(tl.int64, bitcast=True)
    else:
        bits = x.to(tl.int32, bitcast=True)
    return bits == 0


@triton.jit
def _scaled_tiles(neg_phi_ptr, grad_ptr, lanes, start, stop, factor, BLOCK_T: tl.constexpr):
    """grad = ∂L/∂lp · factor over [start, stop); exactly 0 at masked tokens whatever factor
    is, ∂L/∂lp · factor at counted ones (NaN where factor is not finite). Each tile's load is
    issued one tile ahead."""
    x = tl.load(neg_phi_ptr + start + lanes, mask=start + lanes < stop, other=0.0)
    for t0 in range(start, stop, BLOCK_T):
        offs = t0 + lanes
        ahead = tl.load(neg_phi_ptr + offs + BLOCK_T, mask=offs + BLOCK_T < stop, other=0.0)
        g = tl.where(_masked(x), 0.0, x * factor)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < stop)
        x = ahead


@triton.jit(do_not_specialize=["N", "T", "S", "chunk", "n_chunks"])
def policy_grad_kernel(neg_phi_ptr, grad_ptr, grad_scale_ptr, grad_out_ptr, row_count_ptr, cu_ptr,
                       N, T, S, chunk, n_chunks,
                       PER_ROW: tl.constexpr, PACKED: tl.constexpr, BLOCK_T: tl.constexpr):
    """The log_prob gradient in log_prob's dtype (see module docstring)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_T)
    factor = tl.load(grad_scale_ptr) * tl.load(grad_out_ptr).to(grad_scale_ptr.dtype.element_ty)
    for c in range(pid, n_chunks, tl.num_programs(0)):
        a = c * chunk
        b = tl.minimum(a + chunk, N)
        if PER_ROW:
            p = a
            while p < b:
                s, start, end = locate_row(p, cu_ptr, S, T, N, PACKED)
                e = piece_end(p, end, b)
                n_b = tl.load(row_count_ptr + s)
                row_factor = tl.where(n_b > 0.0, factor / tl.where(n_b > 0.0, n_b, 1.0), 0.0)
                _scaled_tiles(neg_phi_ptr, grad_ptr, lanes, p, e, row_factor, BLOCK_T)
                p = e
        else:
            _scaled_tiles(neg_phi_ptr, grad_ptr, lanes, a, b, factor, BLOCK_T)
