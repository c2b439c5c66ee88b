"""Tiny kernels whose sm_90 SASS tests/test_sass.py reads: the same loop with a block
reduction inside (a ``BAR.SYNC`` per iteration) and with a lane accumulator (none), and a
load predicated on a loaded value (a dependent-load chain) against a bounds-only one; the
package's fast division against IEEE division."""
import triton
import triton.language as tl

from isreshape_triton.kernels.common import fast_div


@triton.jit
def sum_in_loop_kernel(x_ptr, out_ptr, n, BLOCK_T: tl.constexpr):
    """Σ x, one tl.sum per tile."""
    lanes = tl.arange(0, BLOCK_T)
    total = tl.zeros([], tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs = t0 + lanes
        total += tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
    tl.store(out_ptr, total)


@triton.jit
def lane_sum_kernel(x_ptr, out_ptr, n, BLOCK_T: tl.constexpr):
    """Σ x, lane accumulators and one tl.sum after the loop."""
    lanes = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs = t0 + lanes
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc))


@triton.jit
def masked_load_kernel(x_ptr, m_ptr, out_ptr, n, MASK_PREDICATES: tl.constexpr, BLOCK_T: tl.constexpr):
    """Σ over counted x: the x load predicated on the loaded mask, or on bounds only."""
    lanes = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs = t0 + lanes
        inb = offs < n
        m = tl.load(m_ptr + offs, mask=inb, other=0.0) != 0.0
        if MASK_PREDICATES:
            x = tl.load(x_ptr + offs, mask=m, other=0.0)
        else:
            x = tl.load(x_ptr + offs, mask=inb, other=0.0)
        acc += tl.where(m, x, 0.0)
    tl.store(out_ptr, tl.sum(acc))


@triton.jit
def fast_div_kernel(x_ptr, y_ptr, out_ptr, n, IEEE: tl.constexpr, BLOCK_T: tl.constexpr):
    """x / y elementwise: ``common.fast_div`` (div.approx through kernels/compat.py) or IEEE
    (``div_rn``)."""
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=1.0)
    y = tl.load(y_ptr + offs, mask=inb, other=1.0)
    if IEEE:
        q = tl.math.div_rn(x, y)
    else:
        q = fast_div(x, y)
    tl.store(out_ptr + offs, q, mask=inb)
