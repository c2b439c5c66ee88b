"""The fused Triton op (run by the interpreter) against the PyTorch reference.

Every test asserts that the Triton kernels ran (launch counter), that the
forward (1 launch, 2 with statistics) and the backward (1 launch) stay within
the budget of SPEC §13, and that no host sync happened (strict sync detector).
Outputs start as NaN (poisoned), so an element a kernel forgets to write fails
the comparison. ``small_chunks`` shrinks the work items so that the tiny test
batches span many chunks and programs (rows cut across chunks, several chunks
per program), exercising every merge path of the chunked kernels.
"""
import inspect
import math
import zlib

import pytest
import torch
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

import isreshape_triton as irt
from isreshape_triton.families import kernel_family
from isreshape_triton import launch
from isreshape_triton.kernels.backward import policy_grad_kernel
from isreshape_triton.kernels.loss import token_loss_kernel
from isreshape_triton.kernels.stats import batch_stats_kernel
from isreshape_triton.ops import fused_policy_loss
from isreshape_triton.dev.profiling import count_work

from _cases import (ADVANTAGES, AGG_MODES, DTYPES, FAMILY_CONFIGS, LAYOUTS, MASKS, SPECIALS,
                    make_batch, pairwise, sampled)
from _rounding import assert_rounded_once

TILINGS = ("default", "small")
CASES = pairwise({"family": FAMILY_CONFIGS, "agg": AGG_MODES, "dtype": DTYPES,
                  "adv": ADVANTAGES, "mask": MASKS, "layout": LAYOUTS, "special": SPECIALS,
                  "tiling": TILINGS})
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _case_id(case):
    lt, opts = case["family"]
    opt = ",".join(f"{k}={v}" for k, v in opts.items())
    return f"{lt}[{opt}]-{case['agg']}-{str(case['dtype'])[6:]}-adv{case['adv']}-{case['mask']}-" \
           f"{case['layout']}-{case['special']}-{case['tiling']}"


SMALL_TILING = launch.Tiling(max_programs=3, chunk_min=16, chunk_max=16)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 tokens on at most 3 programs: rows span chunks, programs walk several."""
    monkeypatch.setattr(launch, "TILING", SMALL_TILING)


def fused_with_counts(lp, olp, adv, mask, loss_type, agg, syncs=0, **opts):
    """Fused forward + backward under the strict sync detector (or, with ``syncs`` > 0,
    that many documented syncs) and the launch counter; ``work.forward`` /
    ``work.backward`` count each half."""
    x = lp.detach().clone().requires_grad_()
    launch.completion_ticket(lp.device)  # allocated once per device and thread, not per call
    strict = syncs == 0
    with count_work(strict=strict, track_memory=False) as work:
        with count_work(strict=strict, track_memory=False) as forward:
            loss, metrics = fused_policy_loss(x, olp, adv, mask, loss_type, agg, **opts)
        with count_work(strict=True, track_memory=False) as backward:
            loss.backward()
    work.forward, work.backward = forward, backward
    return loss.detach(), metrics, x.grad, work


def reference(lp, olp, adv, mask, loss_type, agg, **opts):
    x = lp.detach().clone().requires_grad_()
    loss, metrics = irt.reference.policy_loss(x, olp, adv, mask, loss_type, agg, **opts)
    loss.backward()
    return loss.detach(), metrics, x.grad


def pinned_gamma(loss_type, opts, metrics):
    """The reference options with ess_exact's γ pinned to the kernel's value
    (the bracket refinement is checked to 1e-3 separately)."""
    if opts.get("gamma") != "ess_exact" or opts.get("gamma_granularity") == "sequence":
        return opts
    pinned = dict(opts)
    if loss_type == "is_reshape_sign":
        del pinned["gamma"]
        return {**pinned, "gamma_pos": float(metrics["gamma_pos"]), "gamma_neg": float(metrics["gamma_neg"])}
    key = "gamma_base" if loss_type == "is_reshape_var" else "gamma"
    return {**pinned, "gamma": float(metrics[key])}


# a token selection's torch ops: the sort of its keys, and packed [S] advantages made per token
SELECTION_OPS = {"aten::sort.values_stable", "aten::arange", "aten::searchsorted.Tensor", "aten::sub.Tensor",
                 "aten::clamp", "aten::index.Tensor"}


def check_against_reference(lp, olp, adv, mask, loss_type, agg, opts, rtol=None, syncs=0):
    loss, metrics, grad, work = fused_with_counts(lp, olp, adv, mask, loss_type, agg, syncs, **opts)
    family_opts = {k: v for k, v in opts.items() if k not in irt.params.CALL_OPTIONS}
    fam_params = irt.make_params(loss_type, **family_opts)
    fam = kernel_family(loss_type, fam_params)
    # the kernel path ran, within budget, without syncs (PSIS smooths with torch ops first); pass 1
    # runs for a family's statistics or a rollout correction's row quantity
    correction = irt.params.rollout_config(None, opts.get("rollout_log_prob"), opts.get("rollout_correction"))
    pass1 = fam.needs_stats or (correction is not None and correction.per_row)
    selects = fam.select_ratio > 0  # a token selection: 3 launches and a sort before the loss pass
    assert work.forward.triton_launches == (2 if pass1 else 1) + 3 * selects, work.forward.kernels
    assert work.backward.triton_launches == 1, work.backward.kernels
    fp8_mask = mask is not None and mask.dtype.is_floating_point and mask.element_size() == 1
    torch_ops = [op for op in work.forward.ops.ops if not (selects and op in SELECTION_OPS)]
    assert len(torch_ops) <= int(fp8_mask) or fam.psis, work.forward.ops.ops
    assert set(work.backward.ops.ops) <= {"aten::ones_like"}, work.backward.ops.ops  # autograd's seed
    assert work.syncs == syncs
    ref_opts = pinned_gamma(loss_type, opts, metrics)
    r_loss, r_metrics, r_grad = reference(lp, olp, adv, mask, loss_type, agg, **ref_opts)
    if rtol is None:
        rtol = 1e-6 if lp.dtype == torch.float64 else 1e-5
    assert loss.dtype == r_loss.dtype and loss.shape == ()
    torch.testing.assert_close(loss, r_loss, rtol=rtol, atol=rtol * (1 + r_loss.abs().item()))
    assert set(metrics) == set(r_metrics) == set(irt.metric_names(loss_type, fam_params,
                                                                  rollout="rollout_log_prob" in opts))
    for name, value in metrics.items():
        assert value.shape == () and value.device == lp.device, name
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, r_metrics[name], rtol=rtol, atol=rtol, msg=name)
    if opts.get("gamma") == "ess_exact":  # the kernel's γ is the reference's to 1e-3
        for name in ("gamma", "gamma_pos", "gamma_neg", "gamma_base", "gamma_mean"):
            if name in metrics:
                unpinned = irt.reference.policy_loss(lp, olp, adv, mask, loss_type, agg, **opts)[1]
                assert abs(float(metrics[name]) - float(unpinned[name])) < 1e-3, name
    # the gradient: dtype, structure (exact zeros where masked), values
    assert grad.dtype == lp.dtype and grad.shape == lp.shape
    # finite wherever the reference's is; a true gradient beyond fp16's range (an unclipped
    # w = e^20, kl_cov) is the same ±inf on both
    finite = torch.isfinite(r_grad)
    assert torch.equal(torch.isfinite(grad), finite) and torch.equal(grad[~finite], r_grad[~finite])
    counted = torch.ones_like(grad, dtype=torch.bool) if mask is None else mask != 0
    assert (grad[~counted] == 0).all()
    g_rtol = max(GRAD_RTOL[lp.dtype], rtol)
    got, want = torch.where(finite, grad, 0.0).float(), torch.where(finite, r_grad, 0.0).float()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=g_rtol, atol=g_rtol * (1e-3 + scale))
    return loss, metrics, grad


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_parity_pairwise(case, poisoned_outputs, monkeypatch):
    loss_type, opts = case["family"]
    if case["tiling"] == "small":
        monkeypatch.setattr(launch, "TILING", SMALL_TILING)
    lp, olp, adv, mask = make_batch(5, 37, case["dtype"], case["adv"], case["mask"], case["layout"],
                                    case["special"], seed=zlib.crc32(_case_id(case).encode()) % 1000)  # not hash(): salted per process
    seq_exact = opts.get("gamma") == "ess_exact" and opts.get("gamma_granularity") == "sequence"
    check_against_reference(lp, olp, adv, mask, loss_type, case["agg"], opts,
                            rtol=2e-3 if seq_exact else None)


@given(B=st.integers(1, 6), T=st.integers(1, 70), family=st.integers(0, len(FAMILY_CONFIGS) - 1),
       agg=st.sampled_from(AGG_MODES), rho=st.floats(0.05, 0.95), clamp=st.floats(0.5, 30.0),
       spread=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_parity_property(B, T, family, agg, rho, clamp, spread, seed):
    loss_type, opts = FAMILY_CONFIGS[family]
    opts = dict(opts)
    if "rho_min" in {f for f in irt.make_params(loss_type).__dataclass_fields__}:
        opts["rho_min"] = rho
    lp, olp, adv, mask = make_batch(B, T, torch.float32, "BT", "bool", seed=seed, spread=spread)
    seq_exact = opts.get("gamma") == "ess_exact" and opts.get("gamma_granularity") == "sequence"
    check_against_reference(lp, olp, adv, mask, loss_type, agg, {**opts, "log_ratio_clamp": clamp},
                            rtol=2e-3 if seq_exact else None)


CLOSED_FORM = [(lt, opts) for lt, opts in FAMILY_CONFIGS if opts.get("gamma") not in ("ess_exact", "psis")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("i", range(len(CLOSED_FORM)), ids=[f"{lt}-{i}" for i, (lt, _) in enumerate(CLOSED_FORM)])
def test_16bit_gradient_is_rounded_once(i, dtype):
    """A bf16 / fp16 log_prob gets the fp32 gradient rounded once to nearest even: bit for
    bit the kernel's fp32 gradient of the same values, and the float64 gradient rounded once
    but within fp32's error of a rounding midpoint. ess_exact and psis are left out: their γ
    is the kernel's own estimate (a bracket to 1e-3, a PSIS fit), not float64's to fp32 precision."""
    loss_type, opts = CLOSED_FORM[i]
    agg = AGG_MODES[i % len(AGG_MODES)]
    lp, olp, adv, mask = make_batch(4, 64, dtype, special="extreme" if i % 3 == 0 else "plain", seed=i)
    grad = fused_with_counts(lp, olp, adv, mask, loss_type, agg, **opts)[2]
    fp32 = fused_with_counts(lp.float(), olp.float(), adv.float(), mask, loss_type, agg, **opts)[2]
    ref64 = reference(lp.double(), olp.double(), adv.double(), mask, loss_type, agg, **opts)[2]
    assert_rounded_once(grad, fp32, ref64, max_near=0.02)


@pytest.mark.parametrize("loss_type,opts", FAMILY_CONFIGS[::3])
def test_sft_and_shapes(loss_type, opts):
    """advantages=None is SFT (A ≡ 1); leading shapes flatten to rows; B = 1, T = 1."""
    for shape in ((1, 1), (1, 17), (2, 3, 9)):
        lp, olp, _, _ = make_batch(math.prod(shape[:-1]), shape[-1], seed=len(shape))
        mask = torch.ones(shape, dtype=torch.bool)
        lp, olp = lp.reshape(shape), olp.reshape(shape)
        loss, metrics, grad = check_against_reference(lp, olp, None, mask, loss_type, "token-mean", opts)
        ones = torch.ones(shape)
        r_loss, _, r_grad = reference(lp, olp, ones, mask, loss_type, "token-mean", **opts)
        torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-6)
        assert grad.shape == shape


@pytest.mark.parametrize("loss_type", irt.LOSS_TYPES)
def test_deterministic_bitwise(loss_type):
    lp, olp, adv, mask = make_batch(7, 300, seed=3)
    first = fused_with_counts(lp, olp, adv, mask, loss_type, "seq-mean-token-mean")
    second = fused_with_counts(lp, olp, adv, mask, loss_type, "seq-mean-token-mean")
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[2], second[2])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


@pytest.mark.parametrize("loss_type", irt.LOSS_TYPES)
@pytest.mark.parametrize("shape,masked", [((0, 5), False), ((3, 0), False), ((3, 6), True)])
def test_empty_and_all_masked(loss_type, shape, masked, poisoned_outputs):
    lp = torch.randn(shape)
    mask = torch.zeros(shape, dtype=torch.bool) if masked else None
    for agg in AGG_MODES:
        loss, metrics, grad, work = fused_with_counts(lp, lp + 1.0, torch.randn(shape), mask, loss_type, agg)
        assert work.triton_launches >= 2
        assert loss.item() == 0.0
        assert all(torch.isfinite(v) for v in metrics.values())
        assert metrics["token_count"].item() == 0.0
        assert grad.shape == shape and (grad == 0).all()


def _brute_force_ess_gamma(ell, rho, lo, hi):
    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    e = torch.exp(grid[:, None] * ell[None, :].double())
    ratio = e.sum(1) ** 2 / (e * e).sum(1) / ell.numel()
    ok = ratio >= rho
    return hi if ok.all() else (lo if not ok[0] else grid[ok.nonzero().max()].item())


@pytest.mark.parametrize("dist", ["normal_0.3", "normal_1", "normal_2", "student_t3", "bimodal", "clamped"])
@pytest.mark.parametrize("rho", [0.1, 0.3, 0.8])
def test_ess_exact_matches_brute_force(dist, rho):
    g = torch.Generator().manual_seed(11)
    n = 4000
    ell = {"normal_0.3": 0.3 * torch.randn(n, generator=g), "normal_1": torch.randn(n, generator=g),
           "normal_2": 2 * torch.randn(n, generator=g),
           "student_t3": torch.randn(n, generator=g) / (torch.randn(3, n, generator=g).pow(2).mean(0)).sqrt(),
           "bimodal": torch.where(torch.rand(n, generator=g) < 0.9, -0.2, 3.0) + 0.1 * torch.randn(n, generator=g),
           "clamped": (8 * torch.randn(n, generator=g)).clamp(-20, 20)}[dist].double()
    lp = ell.reshape(8, n // 8).float()
    _, metrics, _, _ = fused_with_counts(lp, torch.zeros_like(lp), None, None, "is_reshape", "token-mean",
                                        gamma="ess_exact", rho_min=rho)
    expected = _brute_force_ess_gamma(lp.double().flatten(), rho, 0.05, 1.0)
    assert abs(metrics["gamma"].item() - expected) < 1e-3


def test_sigma_sq_far_from_zero_mean():
    """ℓ = 5 + 1e-3·N(0,1) over 10⁶ tokens: σ² and γ exact to 1e-3 relative."""
    g = torch.Generator().manual_seed(0)
    ell = 5.0 + 1e-3 * torch.randn(1000, 1000, generator=g, dtype=torch.float64)
    lp = torch.zeros(1000, 1000)
    _, metrics, _, _ = fused_with_counts(lp, (lp.double() - ell).float(), None, None, "is_reshape",
                                        "token-mean", gamma_max=1e6)
    ell32 = (lp.double() - (lp.double() - ell).float().double())
    var = ell32.var().item()
    assert abs(metrics["sigma_sq"].item() / var - 1) < 1e-3
    assert abs(metrics["gamma"].item() / math.sqrt(-math.log(0.3) / var) - 1) < 1e-3


@pytest.mark.parametrize("spread,center", [(1e-12, 0.0), (1e-20, 0.0), (1e-3, 5.0), (1.0, 0.0)])
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("loss_type", ["ppo_clip", "is_reshape_sign"])
def test_skew_kurtosis_moments_of_tiny_log_ratios(spread, center, tiling, loss_type):
    """Skewness and excess kurtosis of ℓ ≈ 1e-12·N(0,1)-like inputs (fp32 (ℓ − c)⁴ ≈ 1e-48
    underflowed: they were 0 and −3) match float64 scipy to 1e-3 on both paths; also far from
    zero and at ordinary spreads, over several programs (small tiling) and lanes; in each lane's
    units (ppo_clip) and in the batch frame of pass 1 (is_reshape_sign)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(7)
    ell = center + spread * (torch.randn(5, 700, generator=g, dtype=torch.float64) ** 3 / 3
                             + torch.randn(5, 700, generator=g, dtype=torch.float64))
    lp = ell.float()
    olp = torch.zeros_like(lp)
    mask = torch.rand(5, 700, generator=g) > 0.3
    adv = torch.randn(5, 700, generator=g)
    saved = launch.TILING
    launch.TILING = SMALL_TILING if tiling == "small" else saved
    try:
        _, metrics, _, _ = fused_with_counts(lp, olp, adv, mask, loss_type, "token-mean")
    finally:
        launch.TILING = saved
    _, ref_metrics = irt.reference.policy_loss(lp, olp, adv, mask, loss_type, "token-mean")
    x = lp.double()[mask].clamp(-20.0, 20.0).numpy()  # ℓ = clamp(d, −20, 20)
    skew, kurt = scipy_stats.skew(x), scipy_stats.kurtosis(x)
    for m in (metrics, ref_metrics):
        assert m["skewness"].item() == pytest.approx(skew, rel=1e-3, abs=1e-4)
        assert m["kurtosis"].item() == pytest.approx(kurt, rel=1e-3, abs=1e-4)


# every family (its first configuration) and every per-row γ rule
ROLLOUT_FAMILIES = (sampled(len(FAMILY_CONFIGS))
                    + [c for c in FAMILY_CONFIGS if c[1].get("gamma_granularity") == "sequence"])


@pytest.mark.parametrize("loss_type,opts", ROLLOUT_FAMILIES)
def test_rollout_weights_on_every_family(loss_type, opts):
    """Rollout IS weights r: L_t = −F_t·r_t (GSPO's row ratio included), or folded into a row weight
    (VESPO's W, ``rollout_in_row``); the kernels
    match the reference, per-row γ rules included (their pass 1 never reads r)."""
    lp, olp, adv, mask = make_batch(4, 45, torch.float64, seed=zlib.crc32(f"{loss_type}{opts}".encode()))
    r = 0.5 + torch.rand(lp.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    check_against_reference(lp, olp, adv, mask, loss_type, "seq-mean-token-mean", {**opts, "rollout_is_weights": r})


KL_CASES = [(t, c) for t in irt.params.KL_TYPES for c in irt.params.KL_CORRECTIONS
            if c is None or not t.endswith("+")]


@pytest.mark.parametrize("kl_type,kl_correction", KL_CASES, ids=[f"{t}-{c}" for t, c in KL_CASES])
def test_kl_variants_match_the_reference(kl_type, kl_correction):
    """Every KL type (verl's "+" straight-through gradients included) with every off-policy
    correction (TRL's ratio, OpenRLHF's unbiased gradient): loss, kl_loss and gradient, kernels
    against the reference, with log-ratios beyond the ±20 clamp and w beyond OpenRLHF's cap."""
    i = KL_CASES.index((kl_type, kl_correction))
    lp, olp, adv, mask = make_batch(3, 37, torch.float64, special="extreme" if i % 2 else "plain", seed=i)
    ref_lp = lp.detach() + 0.4 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(i), dtype=lp.dtype)
    olp = olp.clone()
    olp[0, :4] = lp[0, :4].detach() - 3.0  # w = e³ > 10
    opts = dict(ref_log_prob=ref_lp, kl_coef=0.3, kl_type=kl_type, kl_correction=kl_correction)
    agg = AGG_MODES[i % len(AGG_MODES)]
    loss, metrics, grad, work = fused_with_counts(lp, olp, adv, mask, "ppo_clip", agg, **opts)
    assert work.forward.triton_launches == 1 and work.syncs == 0
    r_loss, r_metrics, r_grad = reference(lp, olp, adv, mask, "ppo_clip", agg, **opts)
    torch.testing.assert_close(loss, r_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(metrics["kl_loss"], r_metrics["kl_loss"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, r_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kl_correction", irt.params.KL_CORRECTIONS)
def test_kl_term_at_a_nonfinite_old_log_prob(kl_correction):
    """A NaN old log-prob at a counted token: k (and kl_loss) is NaN where the correction reads
    w = exp(ℓ) (the ratio's k·w; the unbiased straight-through k + s − sg(s)), finite without
    one, on both paths; the loss is NaN."""
    lp, olp, adv, mask = make_batch(2, 9, torch.float64, seed=3)
    olp = olp.clone()
    olp[1, 2], mask[1, 2] = float("nan"), True
    opts = dict(ref_log_prob=lp.detach() - 0.3, kl_coef=0.3, kl_type="k3", kl_correction=kl_correction)
    loss, metrics, grad, work = fused_with_counts(lp, olp, adv, mask, "ppo_clip", "token-mean", **opts)
    assert work.forward.triton_launches == 1
    r_loss, r_metrics, r_grad = reference(lp, olp, adv, mask, "ppo_clip", "token-mean", **opts)
    assert loss.isnan() and r_loss.isnan()
    assert metrics["kl_loss"].isnan() == (kl_correction is not None)
    torch.testing.assert_close(metrics["kl_loss"], r_metrics["kl_loss"], rtol=1e-9, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(grad, r_grad, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("n_tokens", [1, 50])
def test_constant_log_ratio_gives_gamma_max(n_tokens):
    lp = torch.zeros(1, n_tokens)
    for gamma in ("ess", "ess_exact"):
        _, metrics, grad, _ = fused_with_counts(lp, lp - 0.7, None, None, "is_reshape", "token-mean",
                                                gamma=gamma)
        assert metrics["gamma"].item() == 1.0 and metrics["sigma_sq"].item() == 0.0
        assert torch.isfinite(grad).all()


def test_float_parameters_are_runtime_arguments():
    """Changing τ, ρ, γ bounds, clip ranges, rollout-correction bounds, B, T, N, S or the chunk
    size never recompiles: floats are not constexpr and integer sizes are not specialised."""
    structural = {"ACC", "HAS_ADV", "HAS_MASK", "PACKED", "SIGN_GROUPS", "ESS_EXACT", "G", "KS",
                  "ROW_STATS", "ROW_TERM", "BLOCK_T", "TOKEN", "ROW_WEIGHT", "ROLLOUT_IN_ROW", "GROUPS",
                  "GAMMA_STATS", "TOKEN_EXTRAS", "OPT", "GAMMA_MODE", "SELECT",
                  "BATCH_STATS", "WRITE_GRAD",
                  "BLOCK_REC", "SEQ_GAMMA", "AGG", "SEQ_AGG", "BLOCK_P", "BLOCK_E", "PER_ROW",
                  "COUNTS_ON_DEVICE", "HAS_ROLLOUT", "CORRECTION", "FAMILY_STATS", "HAS_REF", "KL_TYPE", "UNIT_STRIDE",
                  "SLOTS",
                  "WARPS"}
    for kernel in (batch_stats_kernel, token_loss_kernel, policy_grad_kernel):
        params = inspect.signature(kernel.fn).parameters
        constexprs = {n for n, p in params.items() if p.annotation is tl.constexpr}
        assert constexprs <= structural, constexprs - structural
        unspecialised = set(kernel.kwargs.get("do_not_specialize") or ())
        for name in ("N", "T", "S", "chunk", "n_chunks", "n_stats"):
            if name in params:
                assert name in unspecialised, (kernel.fn.__name__, name)


def test_unit_stride_specialization_follows_the_layout(monkeypatch):
    """Contiguous token streams take the UNIT_STRIDE addresses, a strided view or [B]
    advantages the general ones; both give the same bits."""
    seen = []
    run = launch.Launch.__call__
    monkeypatch.setattr(launch.Launch, "__call__", lambda self: (seen.append(self.constexprs.get("UNIT_STRIDE")),
                                                              run(self))[1])
    out = {}
    for layout, adv in (("contiguous", "BT"), ("strided", "BT"), ("contiguous", "B")):
        seen.clear()
        lp, olp, A, mask = make_batch(3, 37, layout=layout, adv=adv, mask="float")
        loss, _ = irt.policy_loss(lp.requires_grad_(), olp, A, mask, "is_reshape")
        loss.backward()
        assert set(seen[:2]) == {layout == "contiguous" and adv == "BT"}  # forward launches
        out[layout, adv] = (loss.detach(), lp.grad)
    assert all(torch.equal(a, b) for a, b in zip(out["contiguous", "BT"], out["strided", "BT"]))


def test_bad_input_on_the_kernel_path():
    lp = torch.randn(2, 3)
    with pytest.raises(ValueError, match="old_log_prob"):
        irt.policy_loss(lp, torch.randn(2, 4))
    with pytest.raises(TypeError, match="log_prob"):
        irt.policy_loss(torch.ones(2, 3, dtype=torch.int64), lp)
    with pytest.raises(ValueError, match="rho_min"):
        irt.policy_loss(lp, lp, rho_min=1.5)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        irt.policy_loss(lp, lp, loss_agg_mode="mean")


def test_policy_loss_module_runs_kernels():
    lp, olp, adv, mask = make_batch(3, 20)
    module = irt.PolicyLoss("ppo_clip", "seq-mean-token-mean", clip_ratio_c=None)
    x = lp.clone().requires_grad_()
    with count_work(strict=True) as work:
        loss, metrics = module(x, olp, adv, mask)
        loss.backward()
    assert work.triton_launches == 2
    r_loss, _, r_grad = reference(lp, olp, adv, mask, "ppo_clip", "seq-mean-token-mean", clip_ratio_c=None)
    torch.testing.assert_close(loss.detach(), r_loss)
    torch.testing.assert_close(x.grad, r_grad)


@pytest.mark.parametrize("loss_type,opts", FAMILY_CONFIGS)
def test_traffic_budget(loss_type, opts):
    """fp32 inputs with a float32 mask: ≤ 44 bytes/token forward + backward (each input
    read at most twice, −m·φ written once, read and scaled once); 17 B/token is the
    single-pass floor for the inputs alone."""
    from isreshape_triton.launch import traffic_model

    B, T = 1024, 4096
    params = irt.make_params(loss_type, **opts)
    streams, buffers = traffic_model(loss_type, torch.float32, torch.float32, B, T, "BT", params, split=True)
    # a token selection (kl_cov, clip_cov) adds its two passes over the inputs (2 × 16 B), the keys
    # (4 B) and the sort's keys in, sorted keys and int64 positions out (16 B): beyond SPEC §13's 44 B
    selection = 2 * 16 + 4 + 16 if kernel_family(loss_type, params).select_ratio else 0
    assert streams / (B * T) <= 44.0 + selection  # the per-token streams
    # records (with ess_exact: 8×32 grid sums each), partials, elements: O(B + chunks + programs)
    assert buffers / (B * T) < 1.0
    forward = traffic_model(loss_type, torch.float32, torch.float32, B, T, "BT", params, backward=False)
    assert forward / (B * T) >= 16.0
