"""``irt.policy_loss_from_logits`` (SPEC §8): the fused selective log-softmax kernels
(interpreter) against the PyTorch reference, Liger-Kernel's Triton GRPO loss as an
outside oracle, the launch / sync / memory budget relative to the log-prob op, batch
invariance (a token's outputs are the same bits in any batch), the vocabulary-parallel
path on 2 and 4 gloo ranks, and the sm_90 compile of every specialization (int64 row
offsets, vectorized tiles, no spills).

Every kernel output starts as NaN (poisoned), so an element a kernel forgets to
write fails the comparison.
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import _disable_current_modes

import isreshape_triton as irt
from isreshape_triton import from_logits
from isreshape_triton.dev import aot
from isreshape_triton.dev.profiling import count_work
from isreshape_triton.reference.from_logits import policy_loss_from_logits as reference_from_logits

from hypothesis import given, settings
from hypothesis import strategies as st

from _cases import AGG_MODES as ALL_AGG_MODES
from _cases import FAMILY_CONFIGS, pairwise, sampled
from _rounding import assert_rounded_once
from test_kernel_robustness import ROUNDING_OFFSETS, _close

GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
FAMILIES = sampled(3)  # every family (its first configuration) and every third row of the shared table
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ENTROPY_BONUS = 0.05


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer either op allocates for its kernels starts as NaN."""
    from isreshape_triton import launch

    def nan_empty(shape, dtype, device):
        with _disable_current_modes():
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "empty_buffer", nan_empty)
    monkeypatch.setattr(from_logits, "_empty", nan_empty)


def make_batch(B, T, V, dtype=torch.float32, layout="BTV", mask="bool", adv="BT", seed=0, scale=2.0):
    """(logits, labels, old_log_prob, advantages, response_mask). Labels at masked
    positions are −100 or out of range; old_log_prob is near the true log-prob.
    layout: "BTV" contiguous, "packed" [N, V], "strided" a [:, :T] view of [B, T+1, V]."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * scale
    logits = full[:, :T]
    labels = torch.randint(0, V, (B, T), generator=g)
    keep = torch.rand(B, T, generator=g) > 0.3
    keep[0, 0] = True
    if mask == "none":
        keep = torch.ones(B, T, dtype=torch.bool)
    labels = torch.where(keep, labels, torch.where(torch.rand(B, T, generator=g) < 0.5, -100, V + 7))
    true_lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    old = (true_lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    advantages = {"BT": torch.randn(B, T, generator=g), "B": torch.randn(B, generator=g), "none": None}[adv]
    response_mask = {"bool": keep, "float": keep.float(), "none": None}[mask]
    if layout == "strided":
        logits = full.to(dtype)[:, :T]
    else:
        logits = logits.to(dtype).contiguous()
    if layout == "packed":  # one sequence of N tokens; advantages per token or None
        N = B * T
        logits, labels, old = logits.reshape(N, V), labels.reshape(N), old.reshape(N)
        advantages = None if advantages is None else advantages.reshape(N)
        response_mask = None if response_mask is None else response_mask.reshape(N)
    return logits, labels, old, advantages, response_mask


def _entropy_bonus(entropy, mask):
    m = torch.ones_like(entropy) if mask is None else mask.float()
    return ENTROPY_BONUS * (entropy * m).sum() / m.sum().clamp(min=1.0)


def run_kernel(logits, labels, old, adv, mask, loss_type, agg, entropy="none", temperature=1.0, **opts):
    """Fused forward + backward under the strict sync detector and the counters (on an
    alias of ``logits``: strided layouts stay strided)."""
    x = logits.detach().requires_grad_()
    with count_work(strict=True, track_memory=False) as work:
        out = irt.policy_loss_from_logits(x, labels, old, adv, mask, loss_type, agg, temperature=temperature,
                                          return_entropy=entropy != "none", **opts)
        total = out[0] - (_entropy_bonus(out[2], mask) if entropy == "loss" else 0.0)
        total.backward()
    ent = out[2].detach() if entropy != "none" else None
    return out[0].detach(), out[1], x.grad, ent, work


def run_reference(logits, labels, old, adv, mask, loss_type, agg, entropy="none", temperature=1.0, **opts):
    y = logits.detach().requires_grad_()
    out = reference_from_logits(y, labels, old, adv, mask, loss_type, agg, temperature=temperature,
                                return_entropy=True, **opts)
    total = out[0] - (_entropy_bonus(out[2], mask) if entropy == "loss" else 0.0)
    total.backward()
    return out[0].detach(), out[1], y.grad, out[2].detach()


def assert_grad_close(grad, ref, dtype):
    rtol = GRAD_RTOL[dtype]
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(grad.float(), ref.float(), rtol=rtol, atol=rtol * (1e-3 + scale))


def check_parity(logits, labels, old, adv, mask, loss_type, agg, entropy="none", temperature=1.0, **opts):
    loss, metrics, grad, ent, work = run_kernel(logits, labels, old, adv, mask, loss_type, agg, entropy,
                                                temperature, **opts)
    r_loss, r_metrics, r_grad, r_ent = run_reference(logits, labels, old, adv, mask, loss_type, agg, entropy,
                                                     temperature, **opts)
    assert work.kernels[0] == "logits_forward_kernel" and work.kernels[-1] == "logits_backward_kernel"
    assert work.syncs == 0
    torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-5 * (1 + r_loss.abs().item()))
    assert set(metrics) == set(r_metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(value, r_metrics[name], rtol=1e-5, atol=1e-5, msg=name)
    if ent is not None:
        assert ent.dtype == torch.float32 and ent.shape == labels.shape
        torch.testing.assert_close(ent, r_ent, rtol=1e-5, atol=1e-5)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape and torch.isfinite(grad).all()
    counted = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask != 0
    if entropy != "loss":
        assert (grad[~counted] == 0).all()  # masked rows: exact zeros
    assert_grad_close(grad, r_grad, logits.dtype)
    return loss, grad, work


CASES = pairwise({"family": FAMILIES, "dtype": (torch.float32, torch.bfloat16, torch.float16),
                  "temperature": (1.0, 0.6, 1.7), "V": (37, 130, 300), "mask": ("bool", "float", "none"),
                  "layout": ("BTV", "packed", "strided"), "entropy": ("none", "returned", "loss"),
                  "adv": ("BT", "B")})


def _case_id(i, case):
    lt, opts = case["family"]
    opt = ",".join(f"{k}={v}" for k, v in opts.items())
    return (f"{lt}[{opt}]-{str(case['dtype'])[6:]}-T{case['temperature']}-V{case['V']}-{case['mask']}-"
            f"{case['layout']}-ent_{case['entropy']}-adv{case['adv']}-{AGG_MODES[i % 5]}")


@pytest.mark.parametrize("i", range(len(CASES)), ids=[_case_id(i, c) for i, c in enumerate(CASES)])
def test_parity_pairwise(i, poisoned):
    case = CASES[i]
    loss_type, opts = case["family"]
    adv = "none" if case["layout"] == "packed" and case["adv"] == "B" else case["adv"]  # [B]: no rows
    batch = make_batch(3, 7, case["V"], case["dtype"], case["layout"], case["mask"], adv, seed=i)
    check_parity(*batch, loss_type, AGG_MODES[i % 5], case["entropy"], case["temperature"],
                 **as_params(loss_type, opts))


def as_params(loss_type, opts):
    """A family's options as ``params=`` (``temperature`` is the op's softmax temperature;
    is_reshape_var's own temperature is a parameter, docs/from_logits.md)."""
    return {"params": irt.make_params(loss_type, **opts)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("i", range(len(FAMILIES)), ids=[f"{lt}-{i}" for i, (lt, _) in enumerate(FAMILIES)])
def test_16bit_grad_logits_are_rounded_once(i, dtype):
    """16-bit grad_logits are the fp32 g·(onehot − p)/temperature rounded once to nearest even:
    bit for bit the kernel's fp32 result for the same logits, and the float64 result rounded
    once but within fp32's error of a rounding midpoint (entropy returned, not in the loss: an
    entropy bonus's gradient is a difference of two terms, fp32's error relative to those)."""
    loss_type, opts = FAMILIES[i]
    opts = as_params(loss_type, opts)
    logits, labels, old, adv, mask = make_batch(3, 5, 300, dtype, seed=i)
    run = (labels, old, adv, mask, loss_type, AGG_MODES[i % len(AGG_MODES)], "returned", (1.0, 0.6, 1.7)[i % 3])
    grad = run_kernel(logits, *run, **opts)[2]
    fp32 = run_kernel(logits.float(), *run, **opts)[2]
    ref64 = run_reference(logits.double(), labels, old.double(), adv.double(), *run[3:], **opts)[2]
    assert_rounded_once(grad, fp32, ref64, max_near=0.02)


@pytest.mark.parametrize("dtype,loss_type,V", [(torch.float32, "is_reshape", 20011), (torch.bfloat16, "sapo", 24576),
                                               (torch.float32, "vespo", 9 * 2048 + 1)])
def test_split_vocabulary_ticket_merge(dtype, loss_type, V, poisoned):
    """Few tokens and a long vocabulary: each token's chunks go to separate programs, the
    last of which merges their records (the ticket path), tails included."""
    batch = make_batch(1, 3, V, dtype, "strided", "bool", seed=V)
    n_chunks, _ = from_logits.vocab_chunks(V)
    assert from_logits.chunks_per_program(3, n_chunks) < n_chunks
    _, _, work = check_parity(*batch, loss_type, "seq-mean-token-mean", "loss", 0.8)
    assert "zeros" in " ".join(work.ops.ops)  # the tickets' memset


def _split_counts(fn):
    with count_work(strict=True, track_memory=False) as fwd:
        loss = fn()
    with count_work(strict=True, track_memory=False) as bwd:
        loss.backward()
    return fwd, bwd


@pytest.mark.parametrize("loss_type,opts,V", [("is_reshape", {}, 300), ("ppo_clip", {}, 300),
                                              ("vespo", {}, 300), ("is_reshape", {"gamma": "psis"}, 300),
                                              ("is_reshape", {}, 3 * 8192)])
def test_launch_budget_relative_to_log_prob_op(loss_type, opts, V):
    """forward = the log-prob op's forward + 1 Triton launch, backward = its backward + 1,
    0 syncs; torch work beyond the log-prob op's: only the tickets' memset (split V)."""
    logits, labels, old, adv, mask = make_batch(2, 3, V, torch.bfloat16, seed=1)
    x = logits.clone().requires_grad_()
    f_fwd, f_bwd = _split_counts(lambda: irt.policy_loss_from_logits(x, labels, old, adv, mask, loss_type,
                                                                      temperature=0.9, **opts)[0])
    lp = irt.selective_log_softmax(logits, labels, 0.9, return_entropy=False)[0].detach().requires_grad_()
    l_fwd, l_bwd = _split_counts(lambda: irt.policy_loss(lp, old, adv, mask, loss_type, **opts)[0])
    n_chunks, _ = from_logits.vocab_chunks(V)
    per_program = from_logits.chunks_per_program(6, n_chunks)
    ticket = per_program < n_chunks
    assert f_fwd.kernels == ["logits_forward_kernel"] + l_fwd.kernels
    assert f_bwd.kernels == l_bwd.kernels + ["logits_backward_kernel"]
    assert f_fwd.torch_launches == l_fwd.torch_launches + ticket, (f_fwd.ops.ops, l_fwd.ops.ops)
    assert f_bwd.torch_launches == l_bwd.torch_launches, (f_bwd.ops.ops, l_bwd.ops.ops)
    assert f_fwd.syncs == f_bwd.syncs == 0
    grids = [r.grid for r in f_fwd.triton.records if r.name == "logits_forward_kernel"]
    assert grids == [(6 * -(-n_chunks // per_program),)]  # ⌈n_chunks / per_program⌉ programs per token


@pytest.mark.parametrize("inplace", [False, True])
def test_peak_extra_memory_is_o_n(inplace):
    """V = 32K, 8 tokens: no [N, V] temporary; the bytes the op allocates beyond the
    gradient it returns stay under 5% of the logits (in place: the gradient is the
    logits' own storage)."""
    logits, labels, old, adv, mask = make_batch(2, 4, 32768, torch.bfloat16, seed=3)
    x = logits.clone().requires_grad_()
    with count_work(strict=True) as work:
        loss, _, ent = irt.policy_loss_from_logits(x, labels, old, adv, mask, "is_reshape", temperature=0.7,
                                                   return_entropy=True, inplace_backward=inplace)
        (loss - _entropy_bonus(ent, mask)).backward()
    grad_bytes = 0 if inplace else logits.numel() * logits.element_size()
    extra = work.peak_bytes - grad_bytes
    assert 0 < extra < 0.05 * logits.numel() * logits.element_size(), (work.peak_bytes, extra)
    if inplace:
        assert x.grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_inplace_backward_overwrites_logits_with_the_gradient():
    """A strided view [:, :T] of [B, T+1, V] logits: the gradient lands in its storage."""
    logits, labels, old, adv, mask = make_batch(2, 5, 300, torch.float16, "strided", seed=4)
    _, _, ref_grad, _, _ = run_kernel(logits, labels, old, adv, mask, "sapo", "token-mean", "loss", 1.3)
    base = logits._base.clone().requires_grad_()
    loss, _, ent = irt.policy_loss_from_logits(base[:, :5], labels, old, adv, mask, "sapo", temperature=1.3,
                                               return_entropy=True, inplace_backward=True)
    (loss - _entropy_bonus(ent, mask)).backward()
    assert torch.equal(base.grad[:, :5], ref_grad) and torch.equal(base.detach()[:, :5], ref_grad)
    assert torch.equal(base.detach()[:, 5], logits._base[:, 5])  # the rest of the storage is untouched


def _z_loss(logits):
    return 1e-2 * torch.logsumexp(logits, -1).square().mean()


# graph(logits, from_logits) → total loss; True: autograd must raise (a backward that runs
# after ours reads the logits it saved), False: the gradient of inplace_backward=False
SHARED_LOGITS = {
    "plain": (lambda x, f: f(x), False),
    "z_loss_after": (lambda x, f: f(x) + _z_loss(x), False),  # logsumexp's backward runs first
    "z_loss_before": (lambda x, f: _z_loss(x) + f(x), True),
    "softcap": (lambda x, f: f(30.0 * torch.tanh(x / 30.0)), False),  # tanh saved its own output
    "tanh_last": (lambda x, f: f(torch.tanh(x)), True),  # tanh saved its output: the logits
    "two_calls": (lambda x, f: f(x) + f(x), True),
}


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("graph", SHARED_LOGITS)
def test_inplace_backward_with_shared_logits(graph, path, monkeypatch):
    """The in-place write bumps the logits' autograd version on both paths: a graph whose
    backward needs the logits after ours raises autograd's error, any other graph gets the
    gradient of inplace_backward=False (and, logits a leaf, its storage holds that gradient)."""
    if path == "reference":
        monkeypatch.setattr(irt.api, "uses_kernels", lambda t: False)
    build, raises = SHARED_LOGITS[graph]
    logits, labels, old, adv, mask = make_batch(2, 3, 7, seed=16)

    def run(inplace):
        def f(z):
            return irt.policy_loss_from_logits(z, labels, old, adv, mask, inplace_backward=inplace)[0]
        x = logits.clone().requires_grad_()
        with count_work(track_memory=False) as work:
            build(x, f).backward()
        assert ("logits_backward_kernel" in work.kernels) == (path == "kernel")
        return x

    expected = run(False).grad
    if raises:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            run(True)
        return
    x = run(True)
    assert torch.equal(x.grad, expected)
    if graph == "plain":
        assert torch.equal(x.detach(), expected)
        assert x.grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("logits,match", [(torch.zeros(2, 7, 3).transpose(1, 2), "unit stride"),
                                          (torch.zeros(1, 3, 7).expand(2, 3, 7), "stride-0")])
def test_inplace_backward_layout_errors_on_both_paths(logits, match, path, monkeypatch):
    if path == "reference":
        monkeypatch.setattr(irt.api, "uses_kernels", lambda t: False)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        irt.policy_loss_from_logits(logits, labels, torch.zeros(2, 3), inplace_backward=True)
    with pytest.raises(ValueError, match=match):
        irt.selective_log_softmax(logits, labels, inplace_backward=True)


def test_masked_rows_are_isolated_and_bad_counted_labels_are_loud(poisoned):
    """NaN logits and garbage labels at masked positions change nothing (exact-zero
    gradient rows, logits not read); a counted label outside [0, V) gives log_prob NaN."""
    logits, labels, old, adv, mask = make_batch(2, 6, 50, seed=5)
    clean = run_kernel(logits, labels, old, adv, mask, "is_reshape", "token-mean")
    dirty = logits.clone()
    dirty[~mask] = float("nan")
    loss, _, grad, _, _ = run_kernel(dirty, labels, old, adv, mask, "is_reshape", "token-mean")
    assert torch.equal(loss, clean[0]) and torch.equal(grad, clean[2])
    assert (grad[~mask] == 0).all()
    bad = labels.clone()
    bad[0, 0] = 50  # counted (make_batch keeps [0, 0]) and out of range: log_prob = NaN, which
    lp, _ = irt.selective_log_softmax(logits, bad)  # the log-prob op treats as a non-finite input
    ref_lp, _ = irt.reference.selective_log_softmax(logits, bad)
    assert torch.isnan(lp[0, 0]) and torch.isnan(ref_lp[0, 0])
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6, equal_nan=True)
    for loss, metrics in (run_kernel(logits, bad, old, adv, mask, "is_reshape", "token-mean")[:2],
                          reference_from_logits(logits, bad, old, adv, mask, "is_reshape")):
        assert torch.isnan(loss) and metrics["nonfinite_tokens"] == 1


def _fuzz_batch(draw):
    """A random from-logits batch: (logits, labels, old, advantages, mask, cu_seqlens, counted)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    V = draw(st.sampled_from([5, 300, 2049, 16500]))
    B, T = (1, draw(st.integers(1, 3))) if V > 9000 else (draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    full = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.5, 3.0]))
    labels = torch.randint(0, V, (B, T), generator=g)
    counted = torch.rand(B, T, generator=g) > draw(st.floats(0.0, 0.8))
    labels = torch.where(counted, labels, torch.where(torch.rand(B, T, generator=g) < 0.5, -100, V + 7))
    true_lp = torch.log_softmax(full[:, :T], -1).gather(-1, labels.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    old = (true_lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = draw(st.sampled_from(["BT", "none"]))
    adv = torch.randn(B, T, generator=g) if adv == "BT" else None
    mask = draw(st.sampled_from(["bool", "float", "none"]))
    if mask == "none":
        counted[:] = True
        labels = labels.clamp(0, V - 1)
    mask = {"bool": counted, "float": counted * 0.5, "none": None}[mask]
    layout = draw(st.sampled_from(["padded", "strided", "packed"]))
    logits = full.to(dtype)[:, :T] if layout == "strided" else full[:, :T].to(dtype).contiguous()
    cu = None
    if layout == "packed":  # rows of random lengths over the B·T tokens
        N = B * T
        cuts = sorted(draw(st.lists(st.integers(0, N), max_size=3)))
        cu = torch.tensor([0, *cuts, N], dtype=torch.int32)
        logits, labels, old, counted = logits.reshape(N, V), labels.reshape(N), old.reshape(N), counted.reshape(N)
        adv = None if adv is None else adv.reshape(N)
        mask = None if mask is None else mask.reshape(N)
    return logits, labels, old, adv, mask, cu, counted


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_fuzz_from_logits_both_paths_agree(data):
    """Random family (the shared table), V (one to several vocabulary chunks), temperature,
    dtype, layout (padded, strided, packed with cu_seqlens), masks and labels (−100 or out of
    range at masked tokens), NaN/±inf logits at masked rows and sometimes at one counted
    token (or a counted label out of range), entropy returned or in the loss: the kernels and
    the reference give the same loss, metrics, entropy and grad_logits (NaN where the other
    has NaN; masked rows exact zeros)."""
    draw = data.draw
    loss_type, opts = draw(st.sampled_from(FAMILY_CONFIGS))
    logits, labels, old, adv, mask, cu, counted = _fuzz_batch(draw)
    V = logits.shape[-1]
    cells = [tuple(c) for c in torch.ones_like(counted).nonzero().tolist()]  # token index tuples
    off = [c for c in cells if not counted[c]]
    bad_values = st.sampled_from([float("nan"), float("inf"), -float("inf")])
    for c in draw(st.lists(st.sampled_from(off), max_size=2, unique=True)) if off else []:
        logits[c + (draw(st.integers(0, V - 1)),)] = draw(bad_values)
    on = [c for c in cells if counted[c]]
    if on and draw(st.booleans()):
        c = draw(st.sampled_from(on))
        if draw(st.booleans()):
            logits[c + (draw(st.integers(0, V - 1)),)] = draw(st.sampled_from([float("nan"), float("inf")]))
        else:
            labels[c] = V
    entropy = draw(st.sampled_from(["returned", "loss"]))
    kw = dict(temperature=float(torch.tensor(draw(st.floats(0.3, 3.0))).float()), cu_seqlens=cu,
              params=irt.make_params(loss_type, **opts))
    agg = draw(st.sampled_from(ALL_AGG_MODES))
    out = []
    for fn in (irt.policy_loss_from_logits, reference_from_logits):
        x = logits.detach().clone().requires_grad_()
        with count_work(strict=False, track_memory=False) as work:  # packed PSIS per row: its one sync
            loss, metrics, ent = fn(x, labels, old, adv, mask, loss_type, agg, return_entropy=True, **kw)
            total = loss - (_entropy_bonus(ent, mask) if entropy == "loss" else 0.0)
            total.backward()
        out.append((loss.detach(), metrics, ent.detach(), x.grad, work.kernels))
    (loss, metrics, ent, grad, kernels), (r_loss, r_metrics, r_ent, r_grad, r_kernels) = out
    assert kernels[0] == "logits_forward_kernel" and not r_kernels
    # the paths' log-probs differ by the rounding of the log-sum-exp (~1e-6 of |z|), which φ and
    # the moments amplify: 1e-4 of each value's scale, the moments with their offsets
    _close(loss, r_loss, 1e-4, "loss", offset=ROUNDING_OFFSETS["loss"])
    assert set(metrics) == set(r_metrics)
    for name, value in metrics.items():
        _close(value, r_metrics[name], 1e-4, name, offset=ROUNDING_OFFSETS.get(name, 0.0))
    z = logits.float().nan_to_num(posinf=0.0, neginf=0.0).abs().max() / kw["temperature"]
    _close(ent, r_ent, 1e-5, "entropy", offset=float(z))  # H = lse − Σ p·z: rounding of |z|, not of H
    _close(grad, r_grad, max(1e-4, GRAD_RTOL[logits.dtype]), "grad_logits")
    if entropy == "returned":
        assert (grad[~counted] == 0).all()


@pytest.mark.parametrize("V", [300, 20011])
def test_peaked_rows_keep_their_digits(V):
    """Rows whose label holds nearly all the mass (z ≈ 30, fp32): log_prob and the label
    column's gradient g·(1 − p) are as accurate as torch's fp32 log_softmax (within 4× its
    error against float64): rounded at the scale of log p, not of lse (an |lp| of 1e-6 came out
    with an error of 2e-6, and the label's gradient lost every digit)."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(2, 4, V, generator=g) * 2.0
    labels = torch.randint(0, V, (2, 4), generator=g)
    logits.scatter_(-1, labels[..., None], logits.amax(-1, keepdim=True) + 7.0)  # z_label − max z_other = 14
    errors = {}
    for name, dtype in (("kernel", torch.float32), ("torch", torch.float32), ("exact", torch.float64)):
        x = logits.to(dtype).detach().clone().requires_grad_()
        if name == "kernel":
            lp = irt.selective_log_softmax(x, labels, 0.5)[0]
        else:
            lp = torch.log_softmax(x / 0.5, -1).gather(-1, labels[..., None])[..., 0]
        lp.sum().backward()
        errors[name] = (lp.detach().double(), x.grad.gather(-1, labels[..., None])[..., 0].double())
    exact_lp, exact_grad = errors.pop("exact")
    assert exact_lp.abs().max() < 1e-4
    (lp_k, grad_k), (lp_t, grad_t) = errors["kernel"], errors["torch"]
    assert (lp_k - exact_lp).abs().max() <= 4 * (lp_t - exact_lp).abs().max() + 1e-9
    assert (grad_k - exact_grad).abs().max() <= 4 * (grad_t - exact_grad).abs().max() + 1e-9


def _paths(monkeypatch=None):
    """(name, policy_loss_from_logits) of the kernel path and the reference."""
    return (("kernel", irt.policy_loss_from_logits), ("reference", reference_from_logits))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("entropy", ["none", "where"])
def test_masked_nonfinite_logits_give_exact_zero_rows_on_both_paths(value, entropy, poisoned):
    """NaN or ±inf logits at masked tokens never reach the loss or the gradient, on the
    reference as on the kernel: the same loss as with clean logits and exact-zero gradient
    rows there (also with an entropy bonus aggregated by torch.where)."""
    logits, labels, old, adv, mask = make_batch(2, 6, 40, seed=9)
    dirty = logits.clone()
    dirty[~mask] = value
    for name, fn in _paths():
        results = []
        for z in (logits, dirty):
            x = z.detach().requires_grad_()
            loss, metrics, ent = fn(x, labels, old, adv, mask, "is_reshape", return_entropy=True)
            total = loss - (0.01 * torch.where(mask, ent, 0.0).sum() if entropy == "where" else 0.0)
            total.backward()
            results.append((loss.detach(), metrics["nonfinite_tokens"], x.grad))
        (loss, nf, grad), (d_loss, d_nf, d_grad) = results
        assert torch.equal(d_loss, loss) and d_nf.item() == 0.0, name
        assert (d_grad[~mask] == 0).all() and torch.equal(d_grad, grad), name


def test_out_of_range_counted_label_is_a_nan_row_on_both_paths(poisoned):
    """A counted label outside [0, V): log_prob NaN, loss NaN, counted in nonfinite_tokens
    and a NaN gradient on its whole row, on both paths; the masked rows stay exact zeros."""
    logits, labels, old, adv, mask = make_batch(2, 5, 30, seed=10)
    bad = labels.clone()
    bad[0, 0] = 30  # counted (make_batch keeps [0, 0])
    grads = []
    for name, fn in _paths():
        x = logits.detach().requires_grad_()
        loss, metrics = fn(x, bad, old, adv, mask, "ppo_clip")
        loss.backward()
        assert torch.isnan(loss) and metrics["nonfinite_tokens"].item() == 1.0, name
        assert x.grad[0, 0].isnan().all(), name
        assert (x.grad[~mask] == 0).all(), name
        grads.append(x.grad)
    assert torch.equal(grads[0].isnan(), grads[1].isnan())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int16,
                                   torch.int32])
def test_every_integer_label_dtype_on_both_paths(dtype, poisoned):
    """Unsigned labels (uint16/32/64 included, which torch's CPU ops refuse) are read as
    int64 on the reference and as they are by the kernels: the same results as int64 labels."""
    logits, labels, old, adv, mask = make_batch(2, 4, 60, seed=11, mask="none")
    expect = reference_from_logits(logits, labels, old, adv, mask, "sapo", return_entropy=True)
    for name, fn in _paths():
        got = fn(logits, labels.to(dtype), old, adv, mask, "sapo", return_entropy=True)
        torch.testing.assert_close(got[0], expect[0], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got[2], expect[2], rtol=1e-5, atol=1e-6, msg=name)
    lp, _ = irt.reference.selective_log_softmax(logits, labels.to(dtype))
    torch.testing.assert_close(lp, irt.selective_log_softmax(logits, labels.to(dtype))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", ["world", object(), 3])
def test_bad_tp_group_is_a_type_error_naming_it(group):
    logits, labels, old, adv, mask = make_batch(1, 3, 20, seed=13)
    for fn in (irt.policy_loss_from_logits, reference_from_logits):
        with pytest.raises(TypeError, match="tp_group"):
            fn(logits, labels, old, adv, mask, tp_group=group)
    with pytest.raises(TypeError, match="tp_group"):
        irt.selective_log_softmax(logits, labels, tp_group=group)


def test_errors_name_the_from_logits_arguments():
    """Shape errors name logits / labels, never the log-prob op's internal log_prob; a
    cu_seqlens shape error speaks of its shape, not its dtype."""
    logits, labels, old, adv, mask = make_batch(1, 6, 20, seed=14)
    for name, fn in _paths():
        with pytest.raises(ValueError, match=r"cu_seqlens, logits must be packed \[N, V\]"):
            fn(logits, labels, old, adv, mask, cu_seqlens=torch.tensor([0, 6]))
        with pytest.raises(ValueError, match="response_mask shape .* labels shape") as e:
            fn(logits, labels, old, adv, mask[:, :5])
        assert "log_prob" not in str(e.value)
        with pytest.raises(ValueError, match="advantages shape .* labels shape"):
            fn(logits, labels, old, adv[:, :5], mask)
        with pytest.raises(ValueError, match="ref_log_prob shape .* labels shape"):
            fn(logits, labels, old, adv, mask, ref_log_prob=old[:, :5], kl_coef=0.1)
        packed = (logits.reshape(6, 20), labels.reshape(6), old.reshape(6), adv.reshape(6), mask.reshape(6))
        with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D \[S \+ 1\].*shape \(1, 2\)") as e:
            fn(*packed, cu_seqlens=torch.tensor([[0, 6]]))
        assert "int64" not in str(e.value)
        with pytest.raises(TypeError, match="cu_seqlens must have dtype int32 or int64, got torch.float32"):
            fn(*packed, cu_seqlens=torch.tensor([0.0, 6.0]))


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_docs_entropy_bonus_recipe(path, monkeypatch):
    """docs/from_logits.md's example runs as written, with NaN logits at masked tokens: the
    entropy bonus (torch.where, not entropy * mask) keeps the loss and gradient finite."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "from_logits.md").read_text()
    marker = "<!-- tested: tests/test_from_logits.py::test_docs_entropy_bonus_recipe -->"
    code = re.search(r"```python\n(.*?)```", doc.split(marker, 1)[1], re.S).group(1)
    assert "torch.where(counted, entropy" in code
    if path == "reference":
        monkeypatch.setattr(irt.api, "uses_kernels", lambda t: False)
    z, labels, old_log_prob, advantages, response_mask = make_batch(2, 6, 40, seed=15)
    z[~response_mask] = float("nan")
    logits = z.requires_grad_()
    scope = dict(logits=logits, labels=labels, old_log_prob=old_log_prob, advantages=advantages,
                 response_mask=response_mask)
    exec(code, scope)
    assert torch.isfinite(scope["loss"]) and torch.isfinite(scope["bonus"])
    grad = logits.grad if path == "reference" else logits.detach()  # inplace_backward: the logits' storage
    assert torch.isfinite(grad).all() and (grad[~response_mask] == 0).all()


def test_negative_infinite_logits_and_determinism(poisoned):
    """−inf logits (truncated vocabulary) give finite results equal to the reference;
    two runs (ticket path) are bit-identical."""
    logits, labels, old, adv, mask = make_batch(1, 2, 4 * 8192 + 3, seed=6)
    logits[..., 100:9000] = float("-inf")
    labels = labels.clamp(max=99) if mask is None else torch.where(mask, labels % 100, labels)
    a = check_parity(logits, labels, old, adv, mask, "ppo_clip", "token-mean", "loss", 0.7)
    b = run_kernel(logits, labels, old, adv, mask, "ppo_clip", "token-mean", "loss", 0.7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[2])


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    logits, labels, old, adv, mask = make_batch(2, 3, 20, seed=12)
    expect = reference_from_logits(logits, labels, old, adv, mask, "sapo", return_entropy=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    with count_work() as work:
        got = irt.policy_loss_from_logits(logits, labels, old, adv, mask, "sapo", return_entropy=True)
        lp, ent = irt.selective_log_softmax(logits, labels)
    assert work.triton_launches == 0
    assert torch.equal(got[0], expect[0]) and torch.equal(got[2], expect[2]) and torch.equal(ent, expect[2])


def test_empty_batch():
    logits = torch.zeros(0, 11, requires_grad=True)
    loss, metrics, ent = irt.policy_loss_from_logits(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                                     return_entropy=True)
    loss.backward()
    assert loss.item() == 0.0 and ent.shape == (0,) and logits.grad.shape == (0, 11)


def test_cu_seqlens_is_passed_on():
    logits, labels, old, adv, mask = make_batch(1, 9, 40, layout="packed", seed=7)
    cu = torch.tensor([0, 4, 9])
    try:
        irt.reference.policy_loss(old, old, adv, mask, cu_seqlens=cu)
    except TypeError:
        pytest.skip("the log-prob op does not take cu_seqlens yet")
    check_parity(logits, labels, old, adv, mask, "is_reshape", "seq-mean-token-mean", "returned", cu_seqlens=cu)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=torch.zeros(2, 3)), TypeError, "labels"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels"),
    (dict(old_log_prob=torch.zeros(3, 2)), ValueError, "old_log_prob"),
    (dict(logits=torch.zeros(2, 3, 5, dtype=torch.float64)), TypeError, "logits"),
    (dict(logits=torch.zeros(2, 3, 5, 1)), ValueError, "logits"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(return_entropy=1), TypeError, "return_entropy"),
    (dict(loss_type="grpo"), ValueError, "loss_type"),
    (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    (dict(logits=torch.zeros(2, 5, 3).transpose(1, 2), inplace_backward=True), ValueError, "inplace_backward"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(logits=torch.zeros(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.long),
                old_log_prob=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        irt.policy_loss_from_logits(**args)


# ----------------------------------------------------------------------------- batch invariance

INVARIANT_V = 1000  # with 256-column tiles and 1-tile chunks: 4 chunks, the last partial
INVARIANT_TARGET = 24  # TARGET_ITEMS (264 on the GPU): the same launch shapes at a tenth of the tokens
# (tokens, layout): every layout at 1, 3 and 8 tokens (4 programs per token); then 15 packed
# tokens (2 chunks per program), 22 padded tokens (≥ 24 positions) and 30 tokens: one program per token
INVARIANT_BATCHES = [(n, layout) for n in (1, 3, 8) for layout in ("2d", "packed", "padded")]
INVARIANT_BATCHES += [(15, "packed"), (22, "padded"), (30, "2d")]


@pytest.fixture
def small_tiles(monkeypatch):
    """256-column tiles, 1-tile chunks and TARGET_ITEMS = 24: INVARIANT_V has 4 chunks, so that
    the interpreter runs every launch of a multi-chunk vocabulary (tickets over 1- and 2-chunk
    programs, one program per token) on small shapes."""
    monkeypatch.setattr(from_logits, "BLOCK_V", 256)
    monkeypatch.setattr(from_logits, "MIN_CHUNK_TILES", 1)
    monkeypatch.setattr(from_logits, "TARGET_ITEMS", INVARIANT_TARGET)
    assert from_logits.vocab_chunks(INVARIANT_V) == (4, 1)


def _batch_around(probes, n, layout, seed):
    """(logits, labels, old_log_prob, advantages, response_mask, cu_seqlens, probe indices):
    n random tokens, the first min(n, len(probes)) of them replaced by the probes (logits
    row, label, old_log_prob, advantage) at seeded places, in ``layout``: "2d" [n, V];
    "packed" [n, V] in up to 4 sequences (cu_seqlens); "padded" [B, T, V] with masked
    padding (garbage logits, label −100)."""
    g = torch.Generator().manual_seed(seed)
    V, dtype = probes[0][0].numel(), probes[0][0].dtype
    z = (torch.randn(n, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    old = -8 * torch.rand(n, generator=g)
    adv = torch.randn(n, generator=g)
    at = torch.randperm(n, generator=g)[:len(probes)].tolist()
    for i, (z_p, label, old_p, adv_p) in zip(at, probes):
        z[i], labels[i], old[i], adv[i] = z_p, label, old_p, adv_p
    if layout == "2d":
        return z, labels, old, adv, None, None, at
    cuts = (torch.randperm(n - 1, generator=g)[:3] + 1).sort().values.tolist()
    cu = torch.tensor([0, *cuts, n])
    if layout == "packed":
        return z, labels, old, adv, None, cu, at
    lengths = cu.diff().tolist()  # one row per sequence, then 3 padding positions
    B, T = len(lengths), max(lengths) + 3
    mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    full = (torch.randn(B, T, V, generator=g) * 50).to(dtype)
    full[mask] = z
    flat = mask.flatten().nonzero().flatten()
    return (full, torch.full((B, T), -100).masked_scatter(mask, labels), torch.zeros(B, T).masked_scatter(mask, old),
            torch.zeros(B, T).masked_scatter(mask, adv), mask, None, flat[at].tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_outputs_are_batch_invariant(dtype, small_tiles, poisoned):
    """A token's log_prob, entropy and gradient row are the same bits alone and in batches
    of 1 to 30 tokens (both sides of TARGET_ITEMS, here 24: tickets and one program per
    token), 2-D, packed with cu_seqlens or padded [B, T, V]: the reduction order over V
    depends on V alone. The probes are confident tokens (max logit 0 at the label, lse ≈
    0.5), whose outputs show one ulp of the sums. ppo_clip with token-sum and a Σ-entropy
    bonus make a token's upstream gradient its own (the op's two halves: the log-softmax,
    then the log-prob op); every token also matches the reference."""
    g = torch.Generator().manual_seed(17)
    probes = []
    for label in (5, 511, 998):  # in the first, an inner and the partial last chunk
        z = torch.randn(INVARIANT_V, generator=g) * 2 - 8
        z[label] = 0.0
        probes.append((z.to(dtype), label, -0.6, 0.7))
    seen, programs = {}, set()
    for batch, n, layout in [([p], 1, "2d") for p in probes] + [(probes, n, lay) for n, lay in INVARIANT_BATCHES]:
        logits, labels, old, adv, mask, cu, at = _batch_around(batch, n, layout, seed=n)
        x = logits.clone().requires_grad_()
        with count_work(strict=True, track_memory=False) as work:
            log_prob, entropy = irt.selective_log_softmax(x, labels, 0.7)
            loss, _ = irt.policy_loss(log_prob, old, adv, mask, "ppo_clip", "token-sum",
                                      **({} if cu is None else {"cu_seqlens": cu}))
            counted = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask
            (loss - 0.01 * torch.where(counted, entropy, 0.0).sum()).backward()
        assert work.kernels.count("logits_forward_kernel") == work.kernels.count("logits_backward_kernel") == 1
        (grid,) = [r.grid for r in work.triton.records if r.name == "logits_forward_kernel"]
        programs.add(grid[0] // labels.numel())
        ref_lp, ref_ent = irt.reference.selective_log_softmax(logits, labels, 0.7)
        torch.testing.assert_close(log_prob, ref_lp, rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(entropy[counted], ref_ent[counted], rtol=1e-5, atol=1e-5)
        for probe, i in zip(batch, at):
            out = (log_prob.flatten()[i], entropy.flatten()[i], x.grad.flatten(0, -2)[i])
            first = seen.setdefault(probe[1], out)
            assert all(map(torch.equal, out, first)), (probe[1], n, layout)
    assert programs == {4, 2, 1}  # programs per token: 1 chunk, 2 chunks, all 4 each


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("loss_type,opts", [("is_reshape", {"gamma": 0.6}), ("sapo", {}),
                                            ("ppo_clip", {"clip_ratio_c": None})])
def test_reference_gradcheck_float64(loss_type, opts):
    """The reference's gradient (loss and entropy bonus) is the true derivative (fp64)."""
    logits, labels, old, adv, mask = make_batch(2, 3, 6, seed=8, scale=1.0)
    old = old.double()

    def f(z):
        loss, _, ent = reference_from_logits(z, labels, old, adv.double(), mask, loss_type, "seq-mean-token-mean",
                                             temperature=0.7, return_entropy=True, **opts)
        return loss - _entropy_bonus(ent, mask), ent

    z = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_reference_entropy_matches_its_definition():
    z = torch.randn(4, 9, dtype=torch.float64)
    z[0, :3] = float("-inf")
    lp, ent = irt.reference.selective_log_softmax(z, torch.tensor([3, 0, 8, -100]), temperature=2.0)
    p = torch.softmax(z / 2.0, -1)
    expect = torch.logsumexp(z / 2.0, -1) - (p * torch.nan_to_num(z / 2.0, neginf=0.0)).sum(-1)
    torch.testing.assert_close(ent, expect)
    assert torch.isnan(lp[3]) and torch.isfinite(lp[:3]).all()


# ----------------------------------------------------------------------------- Liger oracle

LIGER = [("grpo", "ppo_clip", "seq-mean-token-mean", True), ("dapo", "ppo_clip", "token-mean", True),
         ("bnpo", "ppo_clip", "token-mean", True), ("dr_grpo", "ppo_clip", "seq-mean-token-sum-norm", True),
         ("sapo", "sapo", "seq-mean-token-mean", True), ("vespo", "vespo", "token-mean", False)]


@pytest.mark.parametrize("liger_type,loss_type,agg,value", LIGER, ids=[c[0] for c in LIGER])
def test_liger_grpo_loss_oracle(liger_type, loss_type, agg, value, poisoned):
    """Liger-Kernel's ``triton_grpo_loss`` (interpreter) on logits [B, L+1, V] (the last
    position dropped, as Liger does), temperature 0.7, [B] advantages, a fully masked row.
    Our loss and grad_logits equal Liger's (VESPO: gradient only; Liger's VESPO value is
    −φ·A·log π, ours −φ·A·ℓ: same gradient, different constant)."""
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    B, L, V, temp = 3, 6, 97, 0.7
    g = torch.Generator().manual_seed(9)
    full = torch.randn(B, L + 1, V, generator=g) * 2
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.25).float()
    mask[1] = 0.0
    true_lp = torch.log_softmax(full[:, :L].double() / temp, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (true_lp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g)
    params = {"ppo_clip": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=None),
              "sapo": dict(tau_pos=1.3, tau_neg=0.9),
              "vespo": dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)}[loss_type]
    agg_opts = {"grpo": dict(global_batch_size=B), "sapo": dict(global_batch_size=B),
                "dr_grpo": dict(global_batch_size=B, loss_scale_factor=L)}.get(liger_type, {})

    x_l = full.clone().requires_grad_()
    l_loss, _ = liger.triton_grpo_loss(x_l, old, None, ids, adv, mask, temperature=temp, beta=0.0, eps_low=0.2,
                                       eps_high=0.28, inplace=False, loss_type=liger_type, reduce=True,
                                       sapo_temperature_pos=1.3, sapo_temperature_neg=0.9)
    l_loss.backward()
    x = full.clone().requires_grad_()
    loss, _ = irt.policy_loss_from_logits(x[:, :L], ids, old, adv, mask, loss_type, agg, temperature=temp,
                                          **params, **agg_opts)
    loss.backward()
    if value:
        torch.testing.assert_close(loss, l_loss.detach(), rtol=1e-5, atol=1e-6)
    assert (x.grad[:, L] == 0).all() and (x_l.grad[:, L] == 0).all()
    scale = x_l.grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(x.grad, x_l.grad, rtol=1e-5, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- vocabulary parallel

TP_CONFIGS = {"batch": [("is_reshape", "token-mean", {})], "split": [("vespo", "seq-mean-token-mean", {})]}


def _tp_batches():
    """A batch, and 3 tokens of a 64K vocabulary (split into chunks on every rank)."""
    return {"batch": make_batch(2, 5, 4 * 24, torch.float32, "strided", "bool", seed=10),
            "split": make_batch(1, 3, 4 * 16384, torch.float32, "BTV", "bool", seed=11)}


def _tp_worker(rank, world, init_file, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    import isreshape_triton as irt  # noqa: F811 - the spawned process imports afresh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, (logits, labels, old, adv, mask) in _tp_batches().items():
        shard = logits.shape[-1] // world
        for loss_type, agg, opts in TP_CONFIGS[name]:
            x = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
            loss, metrics, ent = irt.policy_loss_from_logits(
                x, labels, old, adv, mask, loss_type, agg, temperature=0.8, return_entropy=True,
                tp_group=dist.group.WORLD, **opts)
            (loss - _entropy_bonus(ent, mask)).backward()
            results[(name, loss_type)] = (loss.detach(), ent.detach(), x.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_vocabulary_parallel_equals_unsharded(world):
    """Each rank holds V/tp columns; one all-gather of the per-token records; every rank
    gets the same loss and entropy (bit-identical) and its shard's gradient, all equal
    to the unsharded op's to 1e-6."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_tp_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    for name, batch in _tp_batches().items():
        shard = batch[0].shape[-1] // world
        for loss_type, agg, opts in TP_CONFIGS[name]:
            loss, _, grad, ent, _ = run_kernel(*batch, loss_type, agg, "loss", 0.8, **opts)
            key = (name, loss_type)
            for r, res in enumerate(ranks):
                assert torch.equal(res[key][0], ranks[0][key][0]) and torch.equal(res[key][1], ranks[0][key][1])
                torch.testing.assert_close(res[key][0], loss, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(res[key][1], ent, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(res[key][2], grad[..., r * shard:(r + 1) * shard], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- sm_90


def _specs(monkeypatch) -> list:
    """The specializations the op launches: forward modes (walk, ticket, records; direct for
    one chunk) × entropy, the merge, the backward's gradient combinations, for fp32 and bf16
    with 16-byte aligned rows; bf16 rows of any alignment (V = 8191); fp16 (same code as
    bf16 but its stores)."""
    configs = [(dt, V, N, world, entropy, grads)
               for dt in (torch.float32, torch.bfloat16) for N, world in ((512, 1), (2, 1), (2, 2))
               for entropy in (False, True) for V in (4 * 8192,) for grads in ((1, 0), (0, 1), (1, 1))]
    configs += [(dt, 8192, 2, 1, entropy, (1, 1))
                for dt in (torch.float32, torch.bfloat16) for entropy in (False, True)]
    configs += [(torch.bfloat16, 8191, 512, world, True, (1, 1)) for world in (1, 2)]
    configs += [(torch.float16, 4 * 8192, 512, 1, True, (1, 1))]
    specs = {}
    for dtype, V, N, world, entropy, (lp_grad, ent_grad) in configs:
        monkeypatch.setattr(from_logits, "_vocab_layout", lambda V, g, w=world: (0, w, 0, w * V))
        logits, labels = torch.zeros(N, V, dtype=dtype), torch.zeros(N, dtype=torch.long)
        cfg = from_logits._Config(1.0, entropy, False, "tp" if world > 1 else None)
        steps, lp, lse, ent = from_logits.plan_forward(logits, labels, cfg)
        launches = [s for s in steps if hasattr(s, "kernel")]
        grads = (lse if lp_grad else None, ent if ent_grad and entropy else None)
        if world == 1 and grads != (None, None):
            launches.append(from_logits.plan_backward(logits, labels, lp, lse, ent, *grads, cfg)[0])
        for launch in launches:
            spec = aot.launch_spec(launch)
            specs[aot.spec_key(spec)] = spec
    return list(specs.values())


def test_specializations_compile_for_sm90_without_spills(monkeypatch, tmp_path):
    specs = _specs(monkeypatch)
    rows = aot.run_in_subprocess(specs, tmp_path / "aot.json")
    assert len(rows) == len(specs)
    assert not [r for r in rows if "error" in r], [r["error"][:300] for r in rows if "error" in r]
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local_bytes"] == 0 for r in rows), rows
    kernels = {r["kernel"].split(":")[1] for r in rows}
    assert kernels == {"logits_forward_kernel", "merge_vocab_records_kernel", "logits_backward_kernel"}


_COMPILE_IR = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from isreshape_triton.dev import aot
    out = []
    for spec in json.load(open(sys.argv[1])):
        fn = aot._kernel(spec["kernel"])
        ce = {k: getattr(tl, v["dtype"]) if isinstance(v, dict) else v for k, v in spec["constexprs"].items()}
        sig = {n: "constexpr" if n in ce else spec["signature"][n] for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
        c = triton.compile(ASTSource(fn, sig, ce, attrs), target=GPUTarget("cuda", 90, 32), options=spec["options"])
        out.append({"ttir": c.asm["ttir"], "ptx": c.asm["ptx"]})
    json.dump(out, open(sys.argv[2], "w"))
""")


def test_int64_row_offsets_and_vectorized_tiles_in_the_compiled_code(tmp_path):
    """N·V > 2³¹ is safe: the token row offset is computed in i64 (TTIR: the strides are
    sign-extended and the logits pointer advances by an i64), whatever N; and with 16-byte
    aligned pointers (as the JIT sees torch tensors) the vocabulary tiles load and store
    128 bits at a time."""
    logits = torch.zeros(2, 3, 8192, dtype=torch.bfloat16)
    labels = torch.zeros(2, 3, dtype=torch.long)
    cfg = from_logits._Config(1.0, True, False)
    steps, lp, lse, ent = from_logits.plan_forward(logits, labels, cfg)
    bwd, _ = from_logits.plan_backward(logits, labels, lp, lse, ent, lse, ent, cfg)
    (tmp_path / "specs.json").write_text(json.dumps([aot.launch_spec(steps[0]), aot.launch_spec(bwd)]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE_IR, str(tmp_path / "specs.json"), str(tmp_path / "ir.json")],
                   env=env, check=True, timeout=600)
    fwd_ir, bwd_ir = json.loads((tmp_path / "ir.json").read_text())
    for ir in (fwd_ir, bwd_ir):
        for stride in ("s_outer", "s_inner"):
            assert f"arith.extsi %{stride} : i32 to i64" in ir["ttir"], stride
        advances = [line.split(" loc(")[0] for line in ir["ttir"].splitlines() if "tt.addptr %logits_ptr" in line]
        assert advances and all(line.endswith(": !tt.ptr<bf16>, i64") for line in advances), advances
        assert "ld.global.v4.b32" in ir["ptx"]
    assert "st.global.v4.b32" in bwd_ir["ptx"]
