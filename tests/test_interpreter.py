"""The interpreter shim (isreshape_triton/interpreter.py): custom-combine reductions and
scans run a whole tree level per combine call and agree exactly with the left fold,
order included (the combine below is associative but not commutative)."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import isreshape_triton.kernels  # noqa: F401  (installs the shim under TRITON_INTERPRET=1)
from isreshape_triton import interpreter as shim


@triton.jit
def _compose(a1, b1, a2, b2):
    """x ↦ a·x + b, first (a1, b1) then (a2, b2): associative, not commutative."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _reduce_kernel(a_ptr, b_ptr, out_a, out_b, AXIS: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    a, b = tl.reduce((tl.load(a_ptr + offs), tl.load(b_ptr + offs)), AXIS, _compose, keep_dims=True)
    if AXIS == 0:
        at = tl.arange(0, N)[None, :]
    else:
        at = tl.arange(0, M)[:, None]
    tl.store(out_a + at, a)
    tl.store(out_b + at, b)


@triton.jit
def _scan_kernel(a_ptr, b_ptr, out_a, out_b, AXIS: tl.constexpr, REVERSE: tl.constexpr, M: tl.constexpr,
                 N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    a, b = tl.associative_scan((tl.load(a_ptr + offs), tl.load(b_ptr + offs)), AXIS, _compose, reverse=REVERSE)
    tl.store(out_a + offs, a)
    tl.store(out_b + offs, b)


def _fold(a, b):
    """Left fold of _compose over the first axis."""
    acc_a, acc_b = a[0].copy(), b[0].copy()
    for k in range(1, a.shape[0]):
        acc_a, acc_b = acc_a * a[k], a[k] * acc_b + b[k]
    return acc_a, acc_b


def _draw(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randint(0, 2, (m, n), generator=g) * 2 - 1).to(torch.int32)  # ±1: exact in int32
    b = torch.randint(-3, 4, (m, n), generator=g, dtype=torch.int32)
    return a, b


def test_shim_is_installed():
    assert interpreter.ReduceOps.generic_reduce is shim._tree_reduce
    assert interpreter.ScanOps.generic_scan is shim._hillis_steele_scan


@pytest.mark.parametrize("axis", [0, 1])
def test_tree_reduce_is_the_ordered_fold(axis):
    m, n = 16, 8
    a, b = _draw(m, n, axis)
    out_a = torch.full((max(m, n), ), 99, dtype=torch.int32)
    out_b = out_a.clone()
    _reduce_kernel[(1, )](a, b, out_a, out_b, AXIS=axis, M=m, N=n)
    an, bn = (a.numpy(), b.numpy()) if axis == 0 else (a.numpy().T, b.numpy().T)
    want_a, want_b = _fold(an, bn)
    k = want_a.shape[0]
    np.testing.assert_array_equal(out_a[:k].numpy(), want_a)
    np.testing.assert_array_equal(out_b[:k].numpy(), want_b)


@pytest.mark.parametrize("axis,reverse", [(0, False), (1, False), (0, True), (1, True)])
def test_hillis_steele_scan_is_the_ordered_prefix(axis, reverse):
    m, n = 8, 16
    a, b = _draw(m, n, 10 + axis + 2 * reverse)
    out_a = torch.full((m, n), 99, dtype=torch.int32)
    out_b = out_a.clone()
    _scan_kernel[(1, )](a, b, out_a, out_b, AXIS=axis, REVERSE=reverse, M=m, N=n)
    an, bn = a.numpy(), b.numpy()
    if axis == 1:
        an, bn = an.T, bn.T
    if reverse:
        an, bn = an[::-1], bn[::-1]
    want = [_fold(an[:k + 1], bn[:k + 1]) for k in range(an.shape[0])]
    want_a, want_b = np.stack([w[0] for w in want]), np.stack([w[1] for w in want])
    if reverse:
        want_a, want_b = want_a[::-1], want_b[::-1]
    if axis == 1:
        want_a, want_b = want_a.T, want_b.T
    np.testing.assert_array_equal(out_a.numpy(), want_a)
    np.testing.assert_array_equal(out_b.numpy(), want_b)
