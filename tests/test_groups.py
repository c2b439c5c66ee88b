"""Lane helpers of kernels/common.py that the record merges rest on, run as kernels (interpreter):
per-warp reductions (``group_sum`` / ``group_max``: lane l belongs to warp (l // 32) mod W, the
lane → thread map of Triton's [L] layout), the exchange of per-warp values through scratch
(``exchange_warps``), the pooled mean that keeps a constant ℓ exact, and the per-lane power
sums of the loss pass (central moments up to M4 far from zero)."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from isreshape_triton.kernels.common import (exchange_warps, group_max, group_sum, moments_reduce, power_sums_add,
                                             power_sums_init, power_sums_moments)


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
    sums = power_sums_init(like)
    for t in range(0, n, L):
        ok = t + lanes < n
        sums = power_sums_add(sums, tl.load(x_ptr + t + lanes, mask=ok, other=0.0), ok)
    c, mean, m2, m3, m4 = power_sums_moments(sums)
    got = exchange_warps(moments_reduce((c, mean, m2), W), scratch_ptr, W, 7)
    n_all, mu, M2 = moments_reduce(got, 0)
    tl.store(out_ptr, n_all)
    tl.store(out_ptr + 1, mu)
    tl.store(out_ptr + 2, M2)
    tl.store(out_ptr + 3, tl.sum(m3))  # about each lane's own mean: compared lane by lane below
    lane_mean = tl.sum(tl.where(lanes == 0, mean, 0.0))
    tl.store(out_ptr + 4, lane_mean)
    tl.store(out_ptr + 5, tl.sum(tl.where(lanes == 0, m4, 0.0)))


@pytest.mark.parametrize("center", [0.0, 5.0, 1000.0])
def test_power_sums_and_pooled_moments_far_from_zero(center):
    L, W, n = 256, 8, 256 * 40 + 17
    g = torch.Generator().manual_seed(int(center))
    x = (center + 1e-2 * torch.randn(n, generator=g)).float()
    out = torch.full((6,), float("nan"))
    _moments_kernel[(1,)](x, n, out, torch.full((3 * W,), float("nan")), L=L, W=W)
    xd = x.double().numpy()
    assert out[0].item() == n
    np.testing.assert_allclose(out[1].item(), xd.mean(), rtol=1e-6)
    np.testing.assert_allclose(out[2].item(), ((xd - xd.mean()) ** 2).sum(), rtol=1e-3)
    lane0 = xd[0::L]
    np.testing.assert_allclose(out[4].item(), lane0.mean(), rtol=1e-6)
    np.testing.assert_allclose(out[5].item(), ((lane0 - lane0.mean()) ** 4).sum(), rtol=1e-2, atol=1e-14)


def test_constant_values_give_exact_zero_central_moments():
    L, W, n = 256, 8, 50
    out = torch.full((6,), float("nan"))
    _moments_kernel[(1,)](torch.full((n,), 0.7), n, out, torch.full((3 * W,), float("nan")), L=L, W=W)
    assert out[0].item() == n and out[1].item() == torch.tensor(0.7).item()
    assert out[2].item() == 0.0 and out[3].item() == 0.0 and out[5].item() == 0.0
