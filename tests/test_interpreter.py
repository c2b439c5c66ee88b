"""The interpreter shim (isreshape_triton/dev/interpreter.py): custom-combine reductions and
scans run a whole tree level per combine call and agree exactly with the left fold,
order included (the combine below is associative but not commutative)."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import isreshape_triton.kernels  # noqa: F401  (installs the shim under TRITON_INTERPRET=1)
from isreshape_triton.dev import interpreter as shim


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


@triton.jit
def _downcast_kernel(x_ptr, stored_ptr, cast_ptr, rtz_ptr, half_ptr, b_ptr, widened_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(stored_ptr + offs, x)  # fp32 into a bf16 pointer: the store casts
    tl.store(cast_ptr + offs, x.to(tl.bfloat16))
    tl.store(rtz_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"))
    tl.store(half_ptr + offs, x)  # fp32 into an fp16 pointer
    tl.store(widened_ptr + offs, tl.load(b_ptr + offs).to(tl.float32))


def _fp32(*bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def test_fp32_bf16_conversions_are_the_gpus():
    """fp32 → bf16 (stored, or cast) rounds to nearest even as torch (and a GPU) does, bit for
    bit: ties to even, subnormals, overflow to ±inf, NaN a NaN; ``rtz`` truncates; fp32 → fp16
    rounds to nearest even too; bf16 → fp32 is exact. The interpreter alone truncates."""
    n = 1 << 16
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-23, -(1 + 2**-8), -(1 + 3 * 2**-8),
                            0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                            torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, 2**-149, 1 + 2**-11])
    special = torch.cat([special, _fp32(0x00008000, 0x00018000, 0x007FFFFF, 0x80018000, 0x7F7F7FFF, 0x7F7F8000,
                                        0xFF7F8000, 0x7F800001, 0xFF800001)])  # subnormal ties, ±max ties, sNaN
    g = torch.Generator().manual_seed(0)
    x = torch.cat([special, _fp32(*torch.randint(0, 1 << 32, (n - special.numel(), ), generator=g).tolist())])
    b = torch.arange(n, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # every bf16
    stored, cast, rtz = (torch.empty(n, dtype=torch.bfloat16) for _ in range(3))
    half, widened = torch.empty(n, dtype=torch.float16), torch.empty(n)
    _downcast_kernel[(1, )](x, stored, cast, rtz, half, b, widened, N=n)
    nan = x.isnan()
    for out, want in ((stored, x.to(torch.bfloat16)), (cast, x.to(torch.bfloat16)), (half, x.to(torch.float16)),
                      (rtz, (x.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16))):
        assert out[nan].isnan().all()
        assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.equal(widened.view(torch.int32), b.float().view(torch.int32))
