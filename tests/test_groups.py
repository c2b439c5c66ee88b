"""Lane helpers of kernels/common.py that the record merges rest on, run as kernels (interpreter):
per-warp reductions (``group_sum`` / ``group_max``: lane l belongs to warp (l // 32) mod W, the
lane → thread map of Triton's [L] layout), the exchange of per-warp values through scratch
(``exchange_warps``), the pooled mean that keeps a constant ℓ exact, and the per-lane power
sums of the loss pass (central moments up to M4 far from zero and for tiny spreads, in each
lane's own units or in the batch frame)."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from isreshape_triton.kernels.common import (batch_frame, central_sums, exchange_warps, group_max, group_sum,
                                             moment_unit, moments_reduce, pow2, power_sums_add, power_sums_init,
                                             power_sums_moments)


@triton.jit
def _groups_kernel(x_ptr, out_ptr, scratch_ptr, L: tl.constexpr, W: tl.constexpr):
    lanes = tl.arange(0, L)
    x = tl.load(x_ptr + lanes)
    s = group_sum(x, W)
    m = group_max(x, W)
    tl.store(out_ptr + lanes, s)
    tl.store(out_ptr + L + lanes, m)
    got = exchange_warps((s, m, x), scratch_ptr, W, 3)  # the third value is not exchanged: 0
    w = tl.arange(0, W)
    tl.store(out_ptr + 2 * L + w, got[0])
    tl.store(out_ptr + 2 * L + W + w, got[1])
    tl.store(out_ptr + 2 * L + 2 * W + w, got[2])
    tl.store(out_ptr + 2 * L + 3 * W, group_sum(got[0], 0))
    tl.store(out_ptr + 2 * L + 3 * W + 1, group_max(got[1], 0))


@pytest.mark.parametrize("L,W", [(256, 8), (512, 8), (256, 4)])
def test_group_reductions_and_exchange(L, W):
    g = torch.Generator().manual_seed(L + W)
    x = torch.randint(-1000, 1000, (L,), generator=g).double()  # exact sums in any order
    x[37] = float("nan")  # a NaN lane: its warp's maximum is NaN, the sums of its warp too
    out = torch.full((2 * L + 3 * W + 2,), float("inf"), dtype=torch.float64)
    scratch = torch.full((3 * W,), float("nan"), dtype=torch.float64)  # poisoned
    _groups_kernel[(1,)](x, out, scratch, L=L, W=W)
    warp = (np.arange(L) // 32) % W
    xs = x.numpy()
    sums = np.array([xs[warp == w].sum() for w in range(W)])
    maxima = np.array([np.nan if np.isnan(xs[warp == w]).any() else xs[warp == w].max() for w in range(W)])
    o = out.numpy()
    np.testing.assert_array_equal(o[:L], sums[warp])
    np.testing.assert_array_equal(o[L:2 * L], maxima[warp])
    np.testing.assert_array_equal(o[2 * L:2 * L + W], sums)
    np.testing.assert_array_equal(o[2 * L + W:2 * L + 2 * W], maxima)
    np.testing.assert_array_equal(o[2 * L + 2 * W:2 * L + 3 * W], np.zeros(W))
    assert np.isnan(o[2 * L + 3 * W]) and np.isnan(o[2 * L + 3 * W + 1])


@triton.jit
def _moments_kernel(x_ptr, n, out_ptr, scratch_ptr, L: tl.constexpr, W: tl.constexpr):
    """Per-lane power sums and Welford moments of x[0:n] (lane l takes x[l], x[l + L], …),
    merged per warp, exchanged, merged across warps."""
    lanes = tl.arange(0, L)
    like = tl.zeros([L], tl.float32)
    sums = power_sums_init(like, False)
    zero = tl.zeros([], tl.float32)
    for t in range(0, n, L):
        ok = t + lanes < n
        sums = power_sums_add(sums, tl.load(x_ptr + t + lanes, mask=ok, other=0.0), ok, (zero, zero, zero), False)
    c, mean, m2, m3, m4 = power_sums_moments(sums, False)
    got = exchange_warps(moments_reduce((c, mean, m2), W), scratch_ptr, W, 7)
    n_all, mu, M2 = moments_reduce(got, 0)
    tl.store(out_ptr, n_all)
    tl.store(out_ptr + 1, mu)
    tl.store(out_ptr + 2, M2)
    tl.store(out_ptr + 3, tl.sum(m3))  # about each lane's own mean: compared lane by lane below
    lane_mean = tl.sum(tl.where(lanes == 0, mean, 0.0))
    tl.store(out_ptr + 4, lane_mean)
    tl.store(out_ptr + 5, tl.sum(tl.where(lanes == 0, m4, 0.0)))  # in units 2^moment_unit (out[6])
    tl.store(out_ptr + 6, tl.sum(tl.where(lanes == 0, pow2(moment_unit(c, m2), m2), 0.0)))
    tl.store(out_ptr + 7, tl.sum(tl.where(lanes == 0, m3, 0.0)))
    tl.store(out_ptr + 8, tl.sum(tl.where(lanes == 0, m2, 0.0)))


@pytest.mark.parametrize("center,spread", [(0.0, 1e-2), (5.0, 1e-2), (1000.0, 1e-2), (0.0, 1e-12), (3e-12, 1e-12),
                                           (0.0, 1e-20), (0.0, 3.0)])
def test_power_sums_and_pooled_moments_far_from_zero(center, spread):
    """Far from zero (|mean| ≫ σ) and tiny spreads (σ⁴ below fp32: the lanes' units)."""
    L, W, n = 256, 8, 256 * 40 + 17
    g = torch.Generator().manual_seed(int(center) + int(-np.log10(spread)))
    x = (center + spread * torch.randn(n, generator=g, dtype=torch.float64) ** 3).float()
    out = torch.full((9,), float("nan"), dtype=torch.float64)
    out32 = out.float()
    _moments_kernel[(1,)](x, n, out32, torch.full((3 * W,), float("nan")), L=L, W=W)
    out = out32.double()
    xd = x.double().numpy()
    assert out[0].item() == n
    np.testing.assert_allclose(out[1].item(), xd.mean(), rtol=1e-6, atol=1e-6 * np.abs(xd - center).max())
    np.testing.assert_allclose(out[2].item(), ((xd - xd.mean()) ** 2).sum(), rtol=1e-3)
    lane0 = xd[0::L]
    dev = lane0 - lane0.mean()
    np.testing.assert_allclose(out[4].item(), lane0.mean(), rtol=1e-6, atol=1e-6 * np.abs(xd - center).max())
    np.testing.assert_allclose(out[8].item(), (dev ** 2).sum(), rtol=1e-3)
    u = out[6].item()
    assert u > 0 and np.log2(u) == round(np.log2(u)) and 0.25 < u * u / ((dev ** 2).mean()) <= 1.0
    scale = max(abs(center), spread) / spread  # x's rounding relative to the spread
    np.testing.assert_allclose(out[5].item(), ((dev / u) ** 4).sum(), rtol=1e-2 if scale > 10 else 1e-4)
    np.testing.assert_allclose(out[7].item(), ((dev / u) ** 3).sum(), rtol=1e-2 if scale > 10 else 1e-4,
                               atol=1e-3 * ((dev / u) ** 2).sum() ** 1.5)


@triton.jit
def _framed_kernel(x_ptr, n, out_ptr, count, total, largest, L: tl.constexpr):
    """Power sums of x[0:n] in the frame of the frame sums (count, Σx, max |x|), summed over the
    lanes: (mean, M2, M3/u³, M4/u⁴, u)."""
    lanes = tl.arange(0, L)
    zero = tl.zeros([], tl.float32)
    frame = batch_frame(count + zero, total + zero, largest + zero)
    sums = power_sums_init(tl.zeros([L], tl.float32), True)
    for t in range(0, n, L):
        ok = t + lanes < n
        sums = power_sums_add(sums, tl.load(x_ptr + t + lanes, mask=ok, other=0.0), ok, frame, True)
    k, s1, s2, s3, s4 = power_sums_moments(sums, True)
    a, m2z, m3z, m4z = central_sums(tl.sum(k), tl.sum(s1), tl.sum(s2), tl.sum(s3), tl.sum(s4))
    c, r, u = frame
    tl.store(out_ptr, c + a * u)
    tl.store(out_ptr + 1, (m2z * u) * u)
    tl.store(out_ptr + 2, m3z)
    tl.store(out_ptr + 3, m4z)
    tl.store(out_ptr + 4, u)


@pytest.mark.parametrize("center,spread", [(0.0, 1e-2), (1000.0, 1e-2), (0.0, 1e-12), (3e-12, 1e-12), (0.0, 1e-20),
                                           (0.0, 3.0), (0.0, 1e4), (5.0, 1e-5)])
def test_power_sums_in_the_batch_frame(center, spread):
    """The frame (Σx/n, 2^-22 of the largest |x|) keeps M2, M3, M4 in fp32 for any spread."""
    n = 256 * 40 + 17
    g = torch.Generator().manual_seed(int(center) + int(-np.log10(spread)))
    x = (center + spread * torch.randn(n, generator=g, dtype=torch.float64) ** 3).float()
    xd = x.double().numpy()
    dev = xd - xd.mean()
    out = torch.full((5,), float("nan"))
    _framed_kernel[(1,)](x, n, out, float(n), float(x.sum()), float(x.abs().max()), L=256)
    o = out.double().numpy()
    u = o[4]
    assert np.log2(u) == round(np.log2(u)) and 2.0 ** 22 <= (np.abs(xd).max() + abs(xd.mean())) / u < 2.0 ** 24
    np.testing.assert_allclose(o[0], xd.mean(), rtol=1e-6, atol=1e-6 * np.abs(dev).max())
    np.testing.assert_allclose(o[1], (dev ** 2).sum(), rtol=1e-4)
    z = dev / u
    np.testing.assert_allclose(o[2], (z ** 3).sum(), rtol=1e-3, atol=1e-4 * (z ** 2).sum() ** 1.5)
    np.testing.assert_allclose(o[3], (z ** 4).sum(), rtol=1e-4)


def test_constant_values_give_exact_zero_central_moments():
    L, W, n = 256, 8, 50
    out = torch.full((9,), float("nan"))
    _moments_kernel[(1,)](torch.full((n,), 0.7), n, out, torch.full((3 * W,), float("nan")), L=L, W=W)
    assert out[0].item() == n and out[1].item() == torch.tensor(0.7).item()
    assert out[2].item() == 0.0 and out[3].item() == 0.0 and out[5].item() == 0.0
