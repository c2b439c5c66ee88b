"""Issue 12's probes, each run on both paths (the Triton kernels under the interpreter
and the PyTorch reference) and checked against each other; every test here failed on
the main of commit e15a9ea and passes now. Then a bounded fuzz of both paths.

* a NaN/±inf log-prob or old log-prob at a counted token: NaN loss, NaN σ² and γ,
  NaN gradient there, ``nonfinite_tokens`` (the kernels clamped it to ℓ = ±20); a NaN
  advantage: NaN gradient there (ppo_clip's was finite);
* the sign family's ``ess*`` metrics finite at ℓ ≈ 20, also with a fixed γ = 3 (their
  sums of e^{γℓ} overflowed fp32);
* a log_prob without grad next to an old_log_prob / advantages with grad: autograd's
  rules (the kernel path crashed on backward);
* fp8 masks (the kernel path crashed); an all-masked batch with per-sequence γ (the
  paths reported different γ); is_reshape_tr's loss value at |ℓ| = 1e-7 (w − 1 in
  fp32); parameters outside fp32, numpy scalars and bools (accepted / refused alike).
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import isreshape_triton as irt
from isreshape_triton import launch
from isreshape_triton.families import FAMILIES
from isreshape_triton.dev.profiling import count_work
from isreshape_triton.params import KL_CORRECTIONS, KL_TYPES

from _cases import FAMILY_CONFIGS, refused_correction
from test_kernels import GRAD_RTOL, SMALL_TILING

F32, F64 = torch.float32, torch.float64
NAN, INF = math.nan, math.inf


def _batch(B=3, T=7, seed=0, dtype=F32, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    olp = -3.0 * torch.rand(B, T, generator=g, dtype=F64) - 0.05
    lp = olp + spread * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return lp.to(dtype), olp.to(dtype), adv.to(dtype), mask


def kernel(lp, olp, adv, mask, loss_type="is_reshape", agg="token-mean", syncs=0, **opts):
    """(loss, metrics, gradient) of the fused op; asserts that its kernels ran, sync-free
    (or with the ``syncs`` documented ones)."""
    x = lp.detach().clone().requires_grad_()
    with count_work(strict=syncs == 0, track_memory=False) as work:
        loss, metrics = irt.policy_loss(x, olp, adv, mask, loss_type, agg, **opts)
        loss.backward()
    assert work.triton_launches >= 2 and work.syncs == syncs, work.kernels
    return loss.detach(), metrics, x.grad


def reference(lp, olp, adv, mask, loss_type="is_reshape", agg="token-mean", **opts):
    x = lp.detach().clone().requires_grad_()
    loss, metrics = irt.reference.policy_loss(x, olp, adv, mask, loss_type, agg, **opts)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, grad


def _close(a, b, rtol, what, offset=0.0):
    """Same NaN pattern (NaN must match NaN); the rest within rtol (atol relative to the
    largest finite magnitude, plus ``offset`` for a value whose rounding scales with more than
    its magnitude: excess kurtosis m4/m2² − 3 carries the rounding of a ratio ≈ 3, skewness
    m3/m2^1.5 that of its terms z³, E|z|³ ≈ 1 however close to 0 their sum is, and a mean of
    signed terms (the loss, ppo_kl, phi_mean, kl_loss) that of its terms, O(1))."""
    a, b = a.double(), b.double()
    assert torch.equal(a.isnan(), b.isnan()), (what, a, b)
    keep = ~a.isnan()
    finite = b[keep & b.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(a[keep], b[keep], rtol=rtol, atol=rtol * (1e-3 + scale + offset),
                               msg=lambda m: f"{what}: {m}")


#: ``_close``'s offset of a value whose rounding scales with more than its magnitude (by name)
ROUNDING_OFFSETS = {"kurtosis": 3.0, "skewness": 1.0, "loss": 1.0, "ppo_kl": 1.0, "phi_mean": 1.0, "kl_loss": 1.0}


def assert_paths_agree(k, r, rtol=1e-5, grad_rtol=1e-5, skip=()):
    """Loss, every metric (but ``skip``) and the gradient of the two paths agree, NaN for NaN."""
    _close(k[0], r[0], rtol, "loss", offset=ROUNDING_OFFSETS["loss"])
    assert k[1].keys() == r[1].keys()
    for name in set(r[1]) - set(skip):
        _close(k[1][name], r[1][name], rtol, name, offset=ROUNDING_OFFSETS.get(name, 0.0))
    assert k[2].dtype == r[2].dtype and k[2].shape == r[2].shape
    _close(k[2], r[2], max(rtol, grad_rtol), "grad")


def both(*args, rtol=1e-5, skip=(), **opts):
    """Both paths on the same input, checked against each other; returns the kernel's."""
    k = kernel(*args, **opts)
    assert_paths_agree(k, reference(*args, **opts), rtol, skip=skip)
    return k


# ============================================================================ non-finite inputs
INJECTIONS = [("log_prob", NAN), ("log_prob", INF), ("log_prob", -INF), ("old_log_prob", NAN),
              ("old_log_prob", -INF)]


@pytest.mark.parametrize("where,value", INJECTIONS)
@pytest.mark.parametrize("loss_type,opts", [("is_reshape", {}), ("is_reshape", {"gamma": "ess_exact"}),
                                            ("is_reshape_sign", {}), ("vespo", {}), ("ppo_clip", {})])
def test_nonfinite_log_prob_at_counted_token(where, value, loss_type, opts):
    lp, olp, adv, mask = _batch()
    {"log_prob": lp, "old_log_prob": olp}[where][1, 2] = value
    mask[1, 2] = True
    loss, metrics, grad = both(lp, olp, adv, mask, loss_type, **opts)
    assert loss.isnan() and metrics["nonfinite_tokens"].item() == 1.0
    assert metrics["sigma_sq"].isnan() and metrics["ppo_kl"].isnan() and metrics["w_max"].isnan()
    gamma = {"is_reshape": "gamma", "is_reshape_sign": "gamma_pos" if adv[1, 2] > 0 else "gamma_neg"}
    if loss_type in gamma:  # a γ from a set holding ℓ = NaN (was computed from ℓ = ±20)
        assert metrics[gamma[loss_type]].isnan()
    assert grad[1, 2].isnan() and torch.all(grad[~mask] == 0)
    assert metrics["token_count"].item() == mask.sum().item()


# the modes that divide by each count (token-sum reads neither)
COUNT_MODES = [("global_token_count", "token-mean"), ("global_batch_size", "seq-mean-token-sum"),
               ("global_batch_size", "seq-mean-token-mean"), ("global_batch_size", "seq-mean-token-sum-norm")]


@pytest.mark.parametrize("name,agg", COUNT_MODES)
@pytest.mark.parametrize("value", [NAN, -1.0, -INF, INF, -3, 0.0, 0, 5.0])
@pytest.mark.parametrize("loss_type,family", [("is_reshape", {}),
                                              ("ppo_clip", {"clip_ratio_low": 0.0, "clip_ratio_high": 0.0})])
def test_bad_count_tensor_is_loud_on_both_paths(name, agg, value, loss_type, family):
    """A 0-dim count tensor whose value is NaN, negative or ±inf: NaN loss, NaN kl_loss and a
    NaN gradient at every counted token on both paths (the kernels took such a value for
    "not given" and used the local count: a plausible wrong loss), clipped tokens (∂L/∂lp = 0)
    included (the backward had kept their 0). 0: loss 0, zero gradient (an empty
    denominator); a good value: as the number. token-sum reads no count."""
    lp, olp, adv, mask = _batch(seed=4)
    ref_lp = olp + 0.1
    count = torch.tensor(value)  # float or int64
    opts = {name: count, "ref_log_prob": ref_lp, "kl_coef": 0.1 if loss_type == "is_reshape" else 0.0, **family}
    if loss_type == "ppo_clip":  # some counted tokens are clipped: their ∂L/∂lp is 0
        assert torch.any(both(lp, olp, adv, mask, loss_type, agg, **{**opts, name: 5.0})[2][mask] == 0)
    loss, metrics, grad = both(lp, olp, adv, mask, loss_type, agg, **opts)
    if isinstance(value, float) and not value > -INF or value < 0 or value == INF:
        assert loss.isnan() and metrics["kl_loss"].isnan()
        assert torch.all(grad[mask].isnan())
        assert metrics["nonfinite_tokens"].item() == 0 and torch.isfinite(metrics["sigma_sq"])
    elif value == 0:
        assert loss.item() == 0.0 and metrics["kl_loss"].item() == 0.0 and torch.all(grad == 0)
    else:
        expect = both(lp, olp, adv, mask, loss_type, agg, **{**opts, name: float(value)})
        assert torch.equal(loss, expect[0]) and torch.equal(grad, expect[2])
    # token-sum ignores a count, bad or not, on both paths
    plain = both(lp, olp, adv, mask, loss_type, "token-sum", **{k: v for k, v in opts.items() if k != name})
    got = both(lp, olp, adv, mask, loss_type, "token-sum", **opts)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[2], plain[2])


@pytest.mark.parametrize("name", ["global_token_count", "global_batch_size"])
@pytest.mark.parametrize("value", [NAN, -1.0, -INF, INF, -2, 1e39])
def test_bad_count_number_raises_on_both_paths(name, value):
    """A count given as a number is checked on the host: negative, NaN, ±inf or beyond fp32
    raise a ValueError naming it, on both paths."""
    lp, olp, adv, mask = _batch()
    for fn in (irt.policy_loss, irt.reference.policy_loss):
        with pytest.raises(ValueError, match=name):
            fn(lp, olp, adv, mask, "is_reshape", "token-mean", **{name: value})


@pytest.mark.parametrize("loss_type", ["is_reshape", "is_reshape_sign"])
def test_nonfinite_single_token_group_statistics(loss_type):
    """A statistic over a group holding one counted token, which is non-finite, is NaN (SPEC §11)."""
    lp, olp, adv = torch.tensor([[NAN, -1.0, -2.0]]), torch.tensor([[-3.2, -1.5, -1.0]]), torch.tensor([[0.5, -1.0, 2.0]])
    loss, metrics, grad = both(lp, olp, adv, torch.tensor([[True, False, False]]), loss_type)
    assert loss.isnan() and metrics["sigma_sq"].isnan()


def test_nonfinite_psis_context():
    """PSIS on the kernel path (torch ops before the kernels) follows the policy: a NaN or
    ±inf ℓ gives NaN γ and k̂ for its group, never γ_min or the fallback (±inf was clamped
    to ±20 there); per row only for that row."""
    for value in (NAN, INF):
        lp, olp, adv, mask = _batch(4, 40, seed=1)
        lp[0, 0] = value
        for loss_type in ("is_reshape", "is_reshape_sign"):
            loss, metrics, grad = both(lp, olp, adv, mask, loss_type, gamma="psis")
            assert metrics["psis_k"].isnan() and metrics["psis_unreliable"].isnan() and grad[mask].isnan().any()
        loss, metrics, grad = both(lp, olp, adv, mask, "is_reshape", gamma="psis", gamma_granularity="sequence")
        assert grad[0][mask[0]].isnan().all() and torch.isfinite(grad[1:]).all()


@pytest.mark.parametrize("rule", ["ess", "psis"])
def test_nonfinite_per_row_sign_metrics_follow_their_own_group(rule):
    lp, olp, adv, mask = _batch(2, 12, seed=1)
    lp[0, 0] = NAN  # A > 0: row 0's γ+ is NaN, its γ− is not
    loss, metrics, grad = both(lp, olp, adv, mask, "is_reshape_sign", gamma=rule, gamma_granularity="sequence")
    assert metrics["gamma_pos"].isnan() and torch.isfinite(metrics["gamma_neg"])


@pytest.mark.parametrize("loss_type", ["ppo_clip", "is_reshape_tr", "sapo", "is_reshape_sign"])
def test_nonfinite_advantage_at_counted_token(loss_type):
    """A NaN advantage: NaN loss and a NaN gradient at that token (ppo_clip's gradient was
    finite), the statistics of ℓ untouched."""
    lp, olp, adv, mask = _batch(seed=1)
    adv[0, 0] = NAN
    loss, metrics, grad = both(lp, olp, adv, mask, loss_type)
    assert loss.isnan() and grad[0, 0].isnan() and metrics["nonfinite_tokens"].item() == 1.0
    assert torch.isfinite(metrics["sigma_sq"]) and torch.isfinite(grad[1:][mask[1:]]).all()


@pytest.mark.parametrize("value", [NAN, -INF])
def test_vespo_nonfinite_first_advantage_taints_its_row(value):
    """VESPO's (k, λ) follow the sign of the row's first counted advantage: a non-finite one
    leaves the sign unknown, so that row's W and gradient are NaN (not silently k_neg, λ_neg);
    other rows keep their gradient."""
    lp, olp, adv, mask = _batch(B=3, T=9, seed=3)
    clean = both(lp, olp, adv, mask, "vespo")
    adv[1, 0] = value  # mask[:, 0] is True: row 1's first counted token
    loss, metrics, grad = both(lp, olp, adv, mask, "vespo")
    assert loss.isnan() and grad[1][mask[1]].isnan().all()
    assert torch.equal(grad[[0, 2]], clean[2][[0, 2]])


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_vespo_nonfinite_rollout_weight_taints_its_row(value):
    """VESPO folds log max(r, 1e-8) into its row weight W: a non-finite rollout IS weight at a
    counted token makes that row's W, and so its whole gradient, NaN on both paths (the
    kernel's max must not drop a NaN r); other rows keep their gradient."""
    lp, olp, adv, mask = _batch(B=3, T=9, seed=4)
    r = torch.full_like(lp, 0.9)
    clean = both(lp, olp, adv, mask, "vespo", rollout_is_weights=r)
    r[1, 0] = value  # mask[:, 0] is True
    loss, metrics, grad = both(lp, olp, adv, mask, "vespo", rollout_is_weights=r)
    assert loss.isnan() and metrics["nonfinite_tokens"].item() == 1.0
    assert grad[1][mask[1]].isnan().all()
    assert torch.equal(grad[[0, 2]], clean[2][[0, 2]])


@pytest.mark.parametrize("kl_type", ["low_var_kl", "kl", "mse"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_ref_log_prob_at_counted_token(kl_type, value):
    """A non-finite ref_log_prob at a counted token is a non-finite token on both paths (NaN
    loss and gradient there, counted), even where low_var_kl's clamp would make it finite; a
    masked one changes nothing."""
    lp, olp, adv, mask = _batch(B=2, T=8, seed=5)
    ref_lp = olp - 0.1
    clean = both(lp, olp, adv, mask, ref_log_prob=ref_lp, kl_coef=0.1, kl_type=kl_type)
    masked = ref_lp.clone()
    masked[~mask] = value
    quiet = both(lp, olp, adv, mask, ref_log_prob=masked, kl_coef=0.1, kl_type=kl_type)
    assert torch.equal(quiet[0], clean[0]) and torch.equal(quiet[2], clean[2])
    ref_lp[1, 0] = value  # counted
    loss, metrics, grad = both(lp, olp, adv, mask, ref_log_prob=ref_lp, kl_coef=0.1, kl_type=kl_type)
    assert loss.isnan() and grad[1, 0].isnan() and metrics["nonfinite_tokens"].item() == 1.0


def test_nonfinite_masked_positions_stay_isolated():
    lp, olp, adv, mask = _batch(B=4, T=9, seed=2)
    dirty = [torch.where(mask, t, torch.full_like(t, v)) for t, v in ((lp, NAN), (olp, INF), (adv, -INF))]
    for loss_type in ("is_reshape", "is_reshape_sign", "vespo"):
        clean = both(lp, olp, adv, mask, loss_type, "seq-mean-token-mean")
        got = both(*dirty, mask, loss_type, "seq-mean-token-mean")
        assert torch.equal(got[0], clean[0]) and torch.equal(got[2], clean[2])
        assert got[1]["nonfinite_tokens"].item() == 0.0


# ============================================================================ metrics overflow
@pytest.mark.parametrize("T,opts", [(6000, {}), (9, {"gamma_pos": 3.0, "gamma_neg": 3.0})])
def test_sign_family_ess_finite_at_large_log_ratio(T, opts):
    """ℓ ≈ 20 in both sign groups. At γ− = 1.99, 6000 terms e^{2γℓ} = e^{79.6} sum past fp32's
    max (the kernels gave inf); at a fixed γ = 3 one term does (NaN). Summed shifted by their
    running max, every ess metric is finite where the loss is."""
    g = torch.Generator().manual_seed(3)
    olp = -3.0 * torch.rand(2, T, generator=g)
    lp = olp + 20.0 - 0.5 * torch.rand(2, T, generator=g)
    lp[:, 0] = olp[:, 0] + 25.0  # clamps to 20
    adv = torch.tensor([[1.0], [-1.0]]).expand(2, T).contiguous()
    # fp32 ℓ ≈ 20 ± 0.25 leaves the third and fourth central moments ~1e-4 relative precision
    loss, metrics, grad = both(lp, olp, adv, None, "is_reshape_sign", skip=("skewness", "kurtosis"), **opts)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    for name in ("ess", "ess_ratio", "ess_pos", "ess_ratio_pos", "ess_neg", "ess_ratio_neg"):
        assert torch.isfinite(metrics[name]) and metrics[name].item() > 0, name
    assert 0 < metrics["ess_ratio"].item() <= 1 and metrics["ess"].item() >= 1


def test_fixed_gamma_three_ess_matches_float64():
    """γ = 3 fixed: ess from the shifted sums equals the float64 value of (Σω)²/Σω²."""
    lp, olp, adv, mask = _batch(B=1, T=6, seed=4)
    mask[:] = True
    adv = adv.abs() + 0.1  # all A > 0: one group
    lp[0, :2] = olp[0, :2] + 20.0
    _, metrics, _ = both(lp, olp, adv, mask, "is_reshape_sign", gamma_pos=3.0, gamma_neg=3.0)
    ell = (lp.double() - olp.double()).clamp(-20, 20)
    z = 3.0 * ell
    w = torch.exp(z - z.max())
    assert metrics["ess"].item() == pytest.approx((w.sum() ** 2 / (w * w).sum()).item(), rel=1e-5)


# ============================================================================ autograd rules
@pytest.mark.parametrize("loss_type", ["is_reshape", "ppo_clip", "vespo"])
def test_constant_inputs_with_grad_follow_autograd_rules(loss_type):
    """old_log_prob and advantages are constants: with a log_prob without grad the loss has
    no grad (backward: autograd's RuntimeError, not AttributeError), and no gradient
    reaches them when log_prob has one."""
    lp, olp, adv, mask = _batch(seed=5)
    olp.requires_grad_()
    adv.requires_grad_()
    for fn in (irt.policy_loss, irt.reference.policy_loss):
        loss, _ = fn(lp, olp, adv, mask, loss_type)
        assert not loss.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
        x = lp.clone().requires_grad_()
        fn(x, olp, adv, mask, loss_type)[0].backward()
        assert x.grad is not None and olp.grad is None and adv.grad is None


# ============================================================================ path divergences
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_mask_on_the_kernel_path(fp8):
    lp, olp, adv, mask = _batch(seed=6)
    weights = torch.where(mask, 0.5, 0.0).to(fp8)
    got = both(lp, olp, adv, weights, "is_reshape", "seq-mean-token-mean")
    plain = kernel(lp, olp, adv, mask, "is_reshape", "seq-mean-token-mean")
    assert torch.equal(got[0], plain[0]) and torch.equal(got[2], plain[2])


@pytest.mark.parametrize("loss_type,opts", [
    ("is_reshape", {"gamma": "ess"}), ("is_reshape_sign", {"gamma": "ess_exact"}),
    ("is_reshape_var", {"gamma": "psis"}), ("is_reshape_sign", {"gamma_pos": 0.3}),
    ("is_reshape", {"gamma": 0.3}), ("is_reshape_sign", {"gamma_pos": 0.3, "gamma_neg": 1.3}),
    ("is_reshape_var", {"gamma": 0.3}),
])
def test_all_masked_sequence_gamma_same_on_both_paths(loss_type, opts):
    lp, olp, adv, _ = _batch(seed=7)
    mask = torch.zeros_like(lp)
    loss, metrics, grad = both(lp, olp, adv, mask, loss_type, gamma_granularity="sequence", **opts)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    for name in metrics:
        assert metrics[name].item() == 0.0, name


@pytest.mark.parametrize("ell", [1e-7, -1e-7, 3e-6])
def test_is_reshape_tr_small_log_ratio_loss_value(ell):
    """expm1, not w − 1: the fp32 kernel loss at |ℓ| = 1e-7 within 1e-5 of the fp64 value's
    change from ℓ = 0 (was 78% off), and the fp64 kernel equals the fp64 reference."""
    lp = torch.tensor([[ell, 0.5 * ell, -ell]], dtype=F64)
    olp = torch.zeros(1, 3, dtype=F64)
    adv = torch.tensor([[1.3, -0.7, 0.4]], dtype=F64)
    l64 = both(lp, olp, adv, None, "is_reshape_tr", rtol=1e-12)[0]
    l32 = both(lp.float(), olp.float(), adv.float(), None, "is_reshape_tr")[0]
    on_policy = reference(olp, olp, adv, None, "is_reshape_tr")[0]
    assert abs(l32.double() - l64).item() <= 1e-5 * abs(l64 - on_policy).item() + 1e-7 * abs(on_policy).item()
    assert l64.item() != 0.0


@pytest.mark.parametrize("loss_type,name", [("is_reshape", "rho_min"), ("is_reshape", "gamma"),
                                            ("is_reshape_tr", "tau_h"), ("ppo_clip", "clip_ratio_c"),
                                            ("sapo", "tau_pos"), ("vespo", "k_pos")])
def test_parameter_numbers_same_rules_on_both_paths(loss_type, name):
    """Outside fp32 (1e39, 1e-50): ValueError naming it; a bool: TypeError; numpy
    scalars: accepted, the same result as the Python float, on both paths."""
    lp, olp, adv, mask = _batch(seed=8)
    for fn in (irt.policy_loss, irt.reference.policy_loss):
        for value in (1e39, -1e39, 1e-50):
            with pytest.raises(ValueError, match=name):
                fn(lp, olp, adv, mask, loss_type, **{name: value})
        for value in (True, np.bool_(False)):
            with pytest.raises(TypeError, match=name):
                fn(lp, olp, adv, mask, loss_type, **{name: value})
    value = {"rho_min": 0.25, "gamma": 0.5, "clip_ratio_c": 3.0}.get(name, 2.0)  # exact in fp32
    base = both(lp, olp, adv, mask, loss_type, **{name: value})
    for scalar in (np.float32, np.float64, np.int64 if value == 2.0 else np.float16):
        got = both(lp, olp, adv, mask, loss_type, **{name: scalar(value)})
        assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        irt.policy_loss(lp, olp, adv, mask, loss_type, log_ratio_clamp=1e39)


# ============================================================================ fuzz: both paths
def _draw_batch(draw, dtype):
    """Padded [B, T] or packed [N] with cu_seqlens (empty sequences allowed, contiguous or strided)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, 20), min_size=1, max_size=5))
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=draw(st.sampled_from([torch.int32, torch.int64])))
        if draw(st.booleans()):  # strided: a column of a 2-D tensor
            cu = torch.stack([cu, torch.full_like(cu, -9)], dim=1)[:, 0]
        shape, rows = (int(cu[-1]),), len(lengths)
    else:
        cu, rows = None, draw(st.integers(1, 4))
        shape = (rows, draw(st.integers(1, 24)))
    olp = -3.0 * torch.rand(shape, generator=g, dtype=F64)
    lp = olp + draw(st.floats(0.05, 4.0)) * torch.randn(shape, generator=g, dtype=F64)
    if draw(st.booleans()):  # some log-ratios beyond the clamp
        far = torch.rand(shape, generator=g) < 0.2
        lp = torch.where(far, olp + draw(st.sampled_from([-25.0, 23.0])), lp)
    adv = torch.randn(shape, generator=g, dtype=F64)
    adv_kind = draw(st.sampled_from(["token", "row", "none"]))
    adv = {"token": adv.to(dtype), "row": torch.randn(rows, generator=g, dtype=F64).to(dtype), "none": None}[adv_kind]
    counted = torch.rand(shape, generator=g) > draw(st.floats(0.0, 0.9))
    mask_kind = draw(st.sampled_from(["bool", "int", "float", "fp8", "none"]))
    if mask_kind == "none":
        counted[:] = True
    mask = {"bool": counted, "int": counted.to(torch.int32), "float": counted * 0.5,
            "fp8": counted.to(torch.float8_e5m2), "none": None}[mask_kind]
    return lp.to(dtype), olp.to(dtype), adv, mask, cu, counted


def _inject(draw, lp, olp, adv, counted, extra=()):
    """NaN/±inf at 0-2 counted and 0-3 masked positions of the token streams (lp, olp, per-token
    advantages and the ``extra`` ones); the number of bad counted tokens."""
    flat = [t.view(-1) for t in (lp, olp, *extra)]
    flat += [adv.view(-1)] if adv is not None and adv.shape == lp.shape else []
    on = counted.view(-1).nonzero().flatten().tolist()
    off = (~counted).view(-1).nonzero().flatten().tolist()
    bad = set()
    for pool, k in ((on, draw(st.integers(0, min(2, len(on))))), (off, draw(st.integers(0, min(3, len(off)))))):
        for i in draw(st.lists(st.sampled_from(pool), min_size=k, max_size=k, unique=True)) if k else []:
            draw(st.sampled_from(flat))[i] = draw(st.sampled_from([NAN, INF, -INF]))
            if pool is on:
                bad.add(i)
    return len(bad)


def _pin_gammas(loss_type, opts, metrics):
    """The reference options with ess_exact's finite batch γ pinned to the kernel's (its
    bracket refinement is checked to 1e-3 in test_kernels); NaN γ stay data-driven."""
    if opts.get("gamma") != "ess_exact" or opts.get("gamma_granularity") == "sequence":
        return opts
    if loss_type == "is_reshape_sign":
        pinned = {k: float(metrics[k]) for k in ("gamma_pos", "gamma_neg") if torch.isfinite(metrics[k])}
        return {**opts, **pinned} if len(pinned) < 2 else {**{k: v for k, v in opts.items() if k != "gamma"},
                                                           **pinned}
    key = "gamma_base" if loss_type == "is_reshape_var" else "gamma"
    return {**opts, "gamma": float(metrics[key])} if torch.isfinite(metrics[key]) else opts


ROLLOUT_CORRECTIONS = [
    {}, {"weight": "mask", "weight_min": 0.6, "weight_max": 1.6}, {"weight": "truncate", "weight_min": 0.8},
    {"weight": None, "reject": "k1", "reject_min": 0.7}, {"reject": "k2", "reject_max": 0.05, "ratio_of": "current"},
    {"weight": "mask", "weight_max": 1.5, "reject": "k3", "reject_max": 0.04},
    {"level": "sequence", "weight_max": 3.0}, {"level": "sequence", "weight": "mask", "weight_min": 0.2},
    {"weight": None, "reject": "k1", "reject_min": 0.2, "reject_max": 5.0, "reject_level": "sequence_sum"},
    {"reject": "k2", "reject_max": 0.08, "reject_level": "sequence_mean", "ratio_of": "current"},
    {"level": "sequence", "reject": "k3", "reject_max": 0.5, "reject_level": "sequence_max"},
]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzz_both_paths_agree(data):
    """Random family and parameters, shapes (padded, packed), dtypes, masks, advantages,
    rollout IS weights (given, or computed from rollout log-probs by any correction), a KL
    term of any type and correction, aggregation, tiling and
    non-finite injections at counted and masked positions of every stream: the two paths give
    the same loss, metrics and gradient (NaN where the other has NaN)."""
    draw = data.draw
    loss_type, opts = draw(st.sampled_from(FAMILY_CONFIGS))
    opts = dict(opts)
    fields = irt.make_params(loss_type).__dataclass_fields__
    if "rho_min" in fields:
        opts["rho_min"] = draw(st.floats(0.05, 0.95))
    for name, lo, hi in (("tau_pos", 0.2, 4.0), ("clip_ratio_high", 0.0, 0.5), ("k_neg", 0.0, 4.0),
                         ("tau_c", 0.1, 3.0), ("temperature", 0.5, 8.0)):
        if name in fields and draw(st.booleans()):  # rounded to fp32: a parameter must be representable there
            opts[name] = float(torch.tensor(draw(st.floats(lo, hi)), dtype=F32))
    dtype = draw(st.sampled_from([F32, F64, torch.bfloat16, torch.float16]))
    lp, olp, adv, mask, cu, counted = _draw_batch(draw, dtype)
    kw = dict(opts, log_ratio_clamp=draw(st.sampled_from([20.0, 3.0])), cu_seqlens=cu)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    rollout = draw(st.sampled_from(["none", "weights", "log_prob"]))
    if rollout == "weights":
        kw["rollout_is_weights"] = torch.exp(0.4 * torch.randn(lp.shape, generator=g, dtype=F64)).to(dtype)
    elif rollout == "log_prob":  # the correction computed in the op: any weight, rejection and ratio
        kw["rollout_log_prob"] = (olp.to(F64) + 0.4 * torch.randn(lp.shape, generator=g, dtype=F64)).to(dtype)
        kw["rollout_correction"] = draw(st.sampled_from([c for c in ROLLOUT_CORRECTIONS if not refused_correction(
            loss_type, opts, c)]))
    if draw(st.booleans()):
        kl_type = draw(st.sampled_from(sorted(KL_TYPES)))
        correction = None if kl_type.endswith("+") else draw(st.sampled_from(KL_CORRECTIONS))
        ref = (olp.to(F64) + 0.3 * torch.randn(lp.shape, generator=g, dtype=F64)).to(dtype)
        kw.update(ref_log_prob=ref, kl_coef=draw(st.sampled_from([0.05, 1.0])), kl_type=kl_type,
                  kl_correction=correction)
    n_bad = _inject(draw, lp, olp, adv, counted, [kw[k] for k in ("rollout_is_weights", "rollout_log_prob",
                                                                  "ref_log_prob") if k in kw])
    agg = draw(st.sampled_from(irt.AGG_MODES))
    # sometimes a count as a 0-dim tensor, good, 0 or bad (NaN / negative / ±inf: a NaN loss
    # where the mode divides by it)
    count_bad = False
    if draw(st.booleans()):
        name = draw(st.sampled_from(["global_token_count", "global_batch_size"]))
        value = draw(st.sampled_from([7.0, 3, 0.0, NAN, -INF, INF, -2.0, -1]))
        kw[name] = torch.tensor(value)
        uses = agg == "token-mean" if name == "global_token_count" else agg.startswith("seq-")
        count_bad = uses and not 0 <= value < INF
    saved = launch.TILING
    launch.TILING = draw(st.sampled_from([saved, SMALL_TILING]))
    psis_rows = opts.get("gamma") == "psis" and opts.get("gamma_granularity") == "sequence"
    try:  # packed PSIS per sequence pads to the longest sequence: one documented sync
        k = kernel(lp, olp, adv, mask, loss_type, agg, syncs=int(psis_rows and cu is not None), **kw)
    finally:
        launch.TILING = saved
    r = reference(lp, olp, adv, mask, loss_type, agg, **_pin_gammas(loss_type, kw, k[1]))
    per_row_exact = opts.get("gamma") == "ess_exact" and opts.get("gamma_granularity") == "sequence"
    rtol = 2e-3 if per_row_exact else (1e-6 if dtype == F64 else 1e-5)
    assert_paths_agree(k, r, rtol, GRAD_RTOL[dtype])
    n_nonfinite = k[1]["nonfinite_tokens"].item()
    if kw.get("rollout_correction", {}).get("reject"):  # a bad token the rejection takes out is not counted
        assert n_nonfinite <= n_bad
    else:
        assert n_nonfinite == n_bad
    assert k[0].isnan() == (n_nonfinite > 0 or count_bad)
    assert torch.all(k[2][~counted.view(k[2].shape)] == 0)


@pytest.mark.parametrize("value", [INF, -INF, NAN])
@pytest.mark.parametrize("granularity", ["batch", "sequence"])
def test_psis_sign_groups_leave_out_a_nonfinite_advantage(granularity, value):
    """is_reshape_sign with gamma="psis": a counted token whose A is ±inf or NaN belongs to
    neither sign group of the Pareto fit, as in the kernels' own statistics and the reference
    (the PSIS context had put A = +inf among the A > 0 tokens: γ+ 0.363 against 0.394)."""
    lp, olp, adv, mask = _batch(B=3, T=40, dtype=F64, spread=1.5)
    adv[1, 2], mask[1, 2] = value, True
    lp[1, 2] = olp[1, 2] + 4.0  # in the tail of either group's fit
    loss, metrics, grad = both(lp, olp, adv, mask, "is_reshape_sign", gamma="psis", gamma_granularity=granularity)
    assert loss.isnan() and torch.isfinite(metrics["gamma_pos"]) and torch.isfinite(metrics["gamma_neg"])


@pytest.mark.parametrize("stream", ["advantages", "rollout_is_weights"])
@pytest.mark.parametrize("loss_type", ["is_reshape", "is_reshape_sign", "is_reshape_var"])
def test_row_gamma_of_a_token_bad_outside_its_log_ratio(loss_type, stream):
    """gamma_granularity="sequence": a token made non-finite by its advantage or rollout weight
    (its ℓ finite) leaves its row's γ finite, so the token means of the rows' γ (is_reshape_var's
    gamma_base included) are finite and equal on both paths, while the token's own terms (φ,
    is_reshape_var's p_case*) are NaN."""
    lp, olp, adv, mask = _batch(dtype=F64)
    r = torch.full_like(lp, 1.25)
    {"advantages": adv, "rollout_is_weights": r}[stream][1, 2] = NAN
    mask[1, 2] = True
    loss, metrics, grad = both(lp, olp, adv, mask, loss_type, gamma_granularity="sequence", rollout_is_weights=r)
    assert loss.isnan() and metrics["nonfinite_tokens"].item() == 1.0 and metrics["phi_mean"].isnan()
    rows = [k for k in FAMILIES[loss_type].metrics if k.startswith("gamma")]  # its row values
    assert rows and all(torch.isfinite(metrics[k]) for k in rows), metrics
    assert loss_type != "is_reshape_var" or metrics["p_case1"].isnan()


@pytest.mark.parametrize("loss_type,opts,names", [
    ("is_reshape", {"gamma": 0.3}, ("gamma",)),
    ("is_reshape_sign", {"gamma_pos": 0.3, "gamma_neg": 1.3}, ("gamma_pos", "gamma_neg")),
])
def test_fixed_sequence_gamma_metrics_are_token_means(loss_type, opts, names):
    """A fixed γ with gamma_granularity="sequence": its metrics are token means of the fixed
    value (the fixed value itself), also next to a non-finite token (a fixed γ stays)."""
    lp, olp, adv, mask = _batch(seed=3)
    lp[1, 2], mask[1, 2] = NAN, True
    loss, metrics, grad = both(lp, olp, adv, mask, loss_type, gamma_granularity="sequence", **opts)
    assert loss.isnan()
    for name, value in zip(names, (0.3, 1.3)):
        torch.testing.assert_close(metrics[name], torch.tensor(value), rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_type,agg", [("is_reshape", "token-mean"), ("vespo", "seq-mean-token-mean"),
                                           ("is_reshape_sign", "seq-mean-token-sum-norm")])
def test_empty_packed_batch_backward(loss_type, agg):
    """N = 0 packed tokens (rows of length 0): loss 0 with a graph, backward gives an empty
    zero gradient on both paths (the reference's padded copy had no graph)."""
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    lp, olp, adv = torch.empty(0), torch.empty(0), torch.empty(0)
    loss, metrics, grad = both(lp, olp, adv, None, loss_type, agg, cu_seqlens=cu)
    assert loss.item() == 0.0 and grad.shape == (0,)
    x = lp.clone().requires_grad_()
    ref = irt.reference.policy_loss(x, olp, adv, None, loss_type, agg, cu_seqlens=cu)[0]
    assert ref.requires_grad
    ref.backward()
    assert x.grad is not None and x.grad.shape == (0,)


@pytest.mark.parametrize("scale,dtype", [(1e-12, torch.float32), (1e-20, torch.float32), (1e-6, torch.float32),
                                         (1e-12, torch.float64)])
@pytest.mark.parametrize("loss_type", ["is_reshape_sign", "ppo_clip"])
def test_moments_of_tiny_log_ratios(scale, dtype, loss_type):
    """ℓ = scale·χ²-like (skewed): scipy's skewness and kurtosis on both paths, also where fp32
    (ℓ − c)⁴ is below 2^-126 (they gave 0 and −3): the power sums are normalised first."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64) ** 2
    olp = torch.zeros(3, 40, dtype=dtype)
    lp = (scale * x).to(dtype)
    _, metrics, _ = both(lp, olp, torch.randn(3, 40, generator=g).to(dtype), None, loss_type)
    ell = (lp.double() - olp.double()).flatten().numpy()
    np.testing.assert_allclose(metrics["skewness"].item(), scipy.stats.skew(ell), rtol=2e-3)
    np.testing.assert_allclose(metrics["kurtosis"].item(), scipy.stats.kurtosis(ell), rtol=2e-3)
