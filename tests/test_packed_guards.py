"""Packed layout (cu_seqlens), issue 17 item 1: a strided cu_seqlens is read by its values, and
malformed offsets (negative, decreasing, past N, past int32) never make the kernels read or write
outside their buffers (SPEC §2), without validate=True.

The interpreter does not catch out-of-bounds accesses (it reads host memory), so every tensor the
test can place — the inputs, cu_seqlens and every buffer the op allocates (``launch.empty_buffer``) — is a
view into the middle of a larger tensor filled with a sentinel, and the guard regions around it
must be intact after forward and backward. (Reads outside a guard cannot be seen this way, but a
read past a buffer of the op lands in its guard, whose sentinel would show in the result only by
chance; the writes are what the guards prove.)"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import isreshape_triton as irt
from isreshape_triton import launch

from test_kernels import SMALL_TILING

GUARD = 4096  # elements either side


def _sentinel(dtype, variant=0):
    if dtype == torch.bool:
        return variant == 0
    if dtype.is_floating_point:
        return (1234.5, -0.375)[variant]
    return (0x5A5A, -3)[variant]


class Guards:
    """Tensors placed inside larger sentinel-filled ones; ``check`` asserts the margins (writes).
    Two runs with different sentinels (``variant``) giving bitwise-equal results show that no
    read landed in a guard either."""

    def __init__(self, variant=0):
        self.placed = []
        self.variant = variant

    def place(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1)
        big = torch.full((flat.numel() + 2 * GUARD,), _sentinel(t.dtype, self.variant), dtype=t.dtype, device=t.device)
        view = big[GUARD:GUARD + flat.numel()]
        view.copy_(flat)
        self.placed.append((big, flat.numel()))
        return view.view(t.shape)

    def empty(self, shape, dtype, device):
        """``launch.empty_buffer``: a placed buffer that starts alike in both runs (sentinel 0)."""
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
        return self.place(torch.full(shape, _sentinel(dtype, 0), dtype=dtype, device=device))

    def check(self):
        for big, n in self.placed:
            s = _sentinel(big.dtype, self.variant)
            for margin in (big[:GUARD], big[GUARD + n:]):
                assert (margin == s).all(), f"guard of a {big.dtype} buffer of {n} elements was written"


@pytest.fixture
def guards(monkeypatch):
    """A factory: guards(variant) routes the op's allocations into a fresh Guards."""
    monkeypatch.setattr(launch, "TILING", SMALL_TILING)  # 16-token chunks: rows span chunks

    def make(variant=0):
        g = Guards(variant)
        monkeypatch.setattr(launch, "empty_buffer", g.empty)
        return g

    return make


N = 40
MALFORMED = {
    "decreasing": [0, 25, 10, 30, N],
    "end_past_n": [0, 12, 1000, N],
    "all_past_n": [0, 5000, 7000],
    "negative": [-7, 3, 20, N],
    "negative_end": [0, 20, -3, N],
    "past_int32": [0, 2 ** 40, N],
    "short_total": [0, 10, 20],  # ends before N: the last tokens belong to no row
    "start_not_zero": [15, 30, N],
}


def _run(make, cu, agg, adv_per_seq, loss_type="is_reshape", mask=True, **opts):
    """Forward and backward in guarded buffers, twice (two sentinels): guards intact, and the
    loss, metrics and gradient bitwise equal (NaN where NaN) between the runs."""
    out = [_run_once(make(v), cu, agg, adv_per_seq, loss_type, mask, opts) for v in (0, 1)]
    for x, y in zip(*out):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(0.5), y.nan_to_num(0.5)), \
            "a result depends on a guard's sentinel: a read outside its buffer"
    return out[0][0], out[0][1]


def _run_once(guards, cu, agg, adv_per_seq, loss_type, mask, opts):
    g = torch.Generator().manual_seed(0)
    S = len(cu) - 1
    lp = guards.place(torch.randn(N, generator=g) * 0.3 - 1.0).requires_grad_()
    olp = guards.place(torch.randn(N, generator=g) * 0.3 - 1.0)
    adv = guards.place(torch.randn(S if adv_per_seq else N, generator=g))
    m = guards.place(torch.rand(N, generator=g) > 0.2) if mask else None
    cu_t = guards.place(torch.tensor(cu, dtype=torch.int64))
    loss, metrics = irt.policy_loss(lp, olp, adv, m, loss_type=loss_type, loss_agg_mode=agg, cu_seqlens=cu_t,
                                    **opts)
    loss.backward()
    guards.check()
    return [loss.detach(), lp.grad] + [torch.as_tensor(v).detach().double().reshape(-1) for v in metrics.values()
                                        if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest.mark.parametrize("agg,adv_per_seq", [("token-mean", False), ("seq-mean-token-mean", True),
                                             ("seq-mean-token-sum-norm", True)])
def test_packed_malformed_offsets_stay_in_bounds(guards, name, agg, adv_per_seq):
    """Any defined value (or NaN) is fine for malformed offsets; no access outside a buffer."""
    loss, grad = _run(guards, MALFORMED[name], agg, adv_per_seq)
    assert loss.shape == () and grad.shape == (N,)


@pytest.mark.parametrize("loss_type,opts", [("vespo", {}), ("is_reshape_sign", {}),
                                            ("is_reshape", {"gamma_granularity": "sequence"})])
def test_packed_malformed_offsets_row_families(guards, loss_type, opts):
    """Families with per-row statistics (VESPO's sequence weight, sign groups, per-sequence γ)
    on malformed rows: their row records are indexed by the (clamped) offsets."""
    for name in ("decreasing", "end_past_n", "negative", "past_int32", "all_past_n"):
        _run(guards, MALFORMED[name], "seq-mean-token-mean", True, loss_type=loss_type, **opts)


def test_packed_valid_offsets_in_guarded_buffers_match_reference(guards):
    cu = [0, 7, 7, 23, N]
    loss, grad = _run(guards, cu, "seq-mean-token-mean", True, mask=False)
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(N, generator=g) * 0.3 - 1.0).requires_grad_()
    olp = torch.randn(N, generator=g) * 0.3 - 1.0
    adv = torch.randn(len(cu) - 1, generator=g)
    ref = irt.reference.policy_loss(lp, olp, adv, None, "is_reshape", "seq-mean-token-mean",
                                    cu_seqlens=torch.tensor(cu))[0]
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), lp.grad.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_strided_cu_seqlens(agg):
    """A column of a 2-D tensor (stride 2) is read by its values, not as if contiguous."""
    g = torch.Generator().manual_seed(3)
    lp, olp = torch.randn(N, generator=g) * 0.3 - 1.0, torch.randn(N, generator=g) * 0.3 - 1.0
    adv = torch.randn(N, generator=g)
    cu = torch.tensor([0, 9, 9, 30, N])
    strided = torch.stack([cu, torch.tensor([3, 1000, -5, 2, 1])], dim=1)[:, 0]
    assert strided.stride(0) == 2
    want = irt.policy_loss(lp, olp, adv, None, loss_agg_mode=agg, cu_seqlens=cu)[0]
    got = irt.policy_loss(lp, olp, adv, None, loss_agg_mode=agg, cu_seqlens=strided)[0]
    ref = irt.reference.policy_loss(lp, olp, adv, None, "is_reshape", agg, cu_seqlens=cu)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-6)
    logits = torch.randn(N, 11, generator=g)
    labels = torch.randint(0, 11, (N,), generator=g)
    a = irt.policy_loss_from_logits(logits, labels, olp, adv, None, loss_agg_mode=agg, cu_seqlens=cu)[0]
    b = irt.policy_loss_from_logits(logits, labels, olp, adv, None, loss_agg_mode=agg, cu_seqlens=strided)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packed_no_sequence_with_tokens_raises():
    """cu_seqlens of length 1 (S = 0) with N > 0 tokens is rejected on the host (a shape check, no
    sync); length 0 is not a valid offsets tensor."""
    lp = torch.zeros(5)
    with pytest.raises(ValueError, match="no sequence"):
        irt.policy_loss(lp, lp, lp, None, cu_seqlens=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S \+ 1\].*shape \(0,\)"):
        irt.policy_loss(lp, lp, lp, None, cu_seqlens=torch.tensor([], dtype=torch.int64))


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_fuzz_malformed_offsets_stay_in_bounds(data):
    """Random offsets (any order, negative, past N, past int32), family and aggregation: no access
    outside a buffer, forward and backward."""
    draw = data.draw
    point = st.one_of(st.integers(-50, 2 * N), st.sampled_from([2 ** 31, 2 ** 40, -2 ** 35]))
    cu = draw(st.lists(point, min_size=2, max_size=6))
    agg, adv_per_seq = draw(st.sampled_from([("token-mean", False), ("seq-mean-token-mean", True),
                                             ("seq-mean-token-sum", True)]))
    loss_type, opts = draw(st.sampled_from([("is_reshape", {}), ("vespo", {}), ("is_reshape_sign", {}),
                                            ("ppo_clip", {}), ("is_reshape", {"gamma_granularity": "sequence"})]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "TILING", SMALL_TILING)

        def make(variant=0):
            g = Guards(variant)
            mp.setattr(launch, "empty_buffer", g.empty)
            return g

        loss, grad = _run(make, cu, agg, adv_per_seq, loss_type=loss_type, **opts)
    assert loss.shape == () and grad.shape == (N,)
