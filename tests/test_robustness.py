"""Issue 12 on the reference path and in the Python API: the non-finite policy
(SPEC §11), overflow-free reference gradients, parameter validation, per-call
options, and the reference side of the path divergences; plus a bounded fuzz
test of the policy (random shapes, dtypes, masks, parameters, injections).

Reference path only (no Triton kernel runs here); the kernel side of the same
probes lives with the kernels.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import isreshape_triton as irt
from isreshape_triton.families import kernel_family
from isreshape_triton.params import AGG_MODES, LOSS_TYPES, AggConfig, make_params

from _cases import FAMILY_CONFIGS

ref = irt.reference
F32, F64 = torch.float32, torch.float64
NAN, INF = math.nan, math.inf
# metrics that reduce ℓ or w over every counted token: NaN when a log-prob is non-finite
ELL_METRICS = ("ppo_kl", "w_mean", "w_max", "sigma_sq", "ess", "ess_ratio",
               "skewness", "kurtosis", "max_weight_ratio")
# metrics that reduce φ: NaN when any input of a counted token is non-finite
PHI_METRICS = ("phi_mean", "phi_abs_max")


def batch(B=3, T=5, seed=0, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    olp = -3.0 * torch.rand(B, T, generator=g, dtype=F64) - 0.05
    lp = olp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    A = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return lp.to(dtype), olp.to(dtype), A.to(dtype), mask


def run(lp, olp, A, mask, loss_type="is_reshape", agg="token-mean", **kw):
    """(loss, metrics, ∂loss/∂log_prob) of the reference."""
    lp = lp.detach().clone().requires_grad_()
    loss, met = ref.policy_loss(lp, olp, A, mask, loss_type, agg, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), met, g


def same(a, b) -> bool:
    """Bitwise equal, NaN equal to NaN."""
    return a.shape == b.shape and bool(torch.all((a == b) | (a.isnan() & b.isnan())))


# ============================================================================ non-finite policy
INJECTIONS = [("log_prob", NAN), ("log_prob", INF), ("log_prob", -INF), ("old_log_prob", NAN),
              ("old_log_prob", -INF), ("advantages", NAN), ("advantages", INF), ("advantages", -INF)]


def inject(lp, olp, A, where, value, pos):
    lp, olp, A = lp.clone(), olp.clone(), A.clone()
    {"log_prob": lp, "old_log_prob": olp, "advantages": A}[where][pos] = value
    return lp, olp, A


@pytest.mark.parametrize("loss_type,opts", FAMILY_CONFIGS[::3] + [("is_reshape_sign", {})])
@pytest.mark.parametrize("where,value", INJECTIONS[::2] + INJECTIONS[5:6])
def test_nonfinite_counted_token_is_loud(loss_type, opts, where, value):
    """NaN loss, NaN gradient there, counted in nonfinite_tokens; a non-finite log-prob
    also makes the statistics over the token NaN (no ℓ clamped to ±20), a non-finite
    advantage leaves the statistics of ℓ alone (main: finite loss for the sign family with
    a NaN A, healthy ESS/skewness/max_weight_ratio next to a NaN loss)."""
    lp, olp, A, mask = batch()
    lp, olp, A = inject(lp, olp, A, where, value, (1, 2))
    mask[1, 2] = True
    loss, met, g = run(lp, olp, A, mask, loss_type, **opts)
    assert loss.isnan()
    assert met["nonfinite_tokens"].item() == 1.0
    assert met["token_count"].item() == mask.sum().item()
    for k in PHI_METRICS + (ELL_METRICS if where != "advantages" else ()):
        assert met[k].isnan(), k
    if where == "advantages":
        assert all(torch.isfinite(met[k]) for k in ELL_METRICS if k not in ("ess", "ess_ratio"))  # γ_t(A)
    assert g[1, 2].isnan()
    assert torch.all(g[~mask] == 0)


def test_nonfinite_tokens_counts_tokens_and_metric_list():
    lp, olp, A, mask = batch(B=3, T=6)
    mask[:] = True
    mask[0, 5] = False
    lp[0, 1], olp[0, 1] = INF, INF  # d = NaN: one token, two bad inputs
    A[2, 3] = NAN
    lp[0, 5] = NAN  # masked: not counted
    _, met, _ = run(lp, olp, A, mask)
    assert met["nonfinite_tokens"].item() == 2.0 and met["nonfinite_tokens"].dtype == F32
    # a [B] advantage is every token of its row
    _, met, _ = run(*batch(B=3, T=6)[:2], torch.tensor([0.5, NAN, 1.0]), torch.ones(3, 6))
    assert met["nonfinite_tokens"].item() == 6.0
    for loss_type in LOSS_TYPES:
        assert irt.metric_names(loss_type)[:2] == ("token_count", "nonfinite_tokens")
    _, met, _ = run(*batch())
    assert met["nonfinite_tokens"].item() == 0.0


@pytest.mark.parametrize("rule", ["ess", "ess_exact", "psis"])
def test_gamma_rules_nan_batch_and_only_the_row(rule):
    """Every data-driven rule gives NaN for a group holding a NaN ℓ (ess_exact's bisection
    gave γ_min, PSIS γ_min, on main), and per row only for that row."""
    lp, olp, A, mask = batch(B=3, T=8, dtype=F64)
    mask[:] = True
    lp[1, 4] = NAN
    loss, met, g = run(lp, olp, A, mask, gamma=rule)
    assert loss.isnan() and met["gamma"].isnan() and met["gamma_mean"].isnan()
    assert torch.all(g.isnan())  # the batch γ is NaN: every φ is
    loss, met, g = run(lp, olp, A, mask, gamma=rule, gamma_granularity="sequence")
    assert loss.isnan() and met["gamma"].isnan()
    assert torch.all(g[1].isnan()) and torch.all(torch.isfinite(g[[0, 2]]))
    _, _, g_clean = run(*batch(B=3, T=8, dtype=F64)[:3], mask, gamma=rule, gamma_granularity="sequence")
    assert torch.equal(g[[0, 2]], g_clean[[0, 2]])
    if rule == "psis":
        assert met["psis_k"].isnan() and met["psis_unreliable"].isnan()


def test_ess_exact_bisection_keeps_nan():
    ell = torch.tensor([[0.1, -0.3, NAN, 0.2], [0.1, -0.3, 0.5, 0.2]], dtype=F64)
    group = torch.ones(2, 4, dtype=torch.bool)
    g = ref.gamma_ess_exact(ell, group, (1,), 0.3, 0.05, 1.0)
    assert g[0].isnan().all() and torch.isfinite(g[1]).all()
    g, k = ref.select_gamma_k("psis", ell, group, (1,), rho_min=0.3, gamma_min=0.05, gamma_max=1.0,
                              empty_value=1.0)
    assert g[0].isnan().all() and k[0].isnan().all() and torch.isfinite(g[1]).all()
    n, _, var = ref.masked_moments(ell[:, :3], torch.tensor([[False, False, True]] * 2), (1,))
    assert var[0].isnan().all() and var[1].item() == 0.0  # one token, NaN: still NaN


def test_sign_family_nan_advantage_is_not_dropped():
    """A NaN A belongs to neither sign group; main gave φ = F = 0 there: a finite loss."""
    lp, olp, A, mask = batch()
    A[0, 0] = NAN
    for sat in ("soft", "none", "truncate", "michaelis_menten"):
        loss, met, g = run(lp, olp, A, mask, "is_reshape_sign", neg_saturation=sat)
        assert loss.isnan() and g[0, 0].isnan() and met["phi_mean"].isnan()
        assert torch.isfinite(met["gamma_pos"]) and torch.isfinite(met["gamma_neg"])  # not in a group
        assert torch.isfinite(met["sigma_sq"])  # ℓ itself is finite


def test_ppo_clip_nan_advantage_nan_gradient_and_clipfrac():
    lp, olp, A, mask = batch()
    A[0, 0] = NAN
    loss, met, g = run(lp, olp, A, mask, "ppo_clip")
    assert loss.isnan() and g[0, 0].isnan() and met["clipfrac"].isnan()
    assert torch.isfinite(g[1:][mask[1:]]).all()


def test_log_ratio_never_clamped_from_nonfinite_nor_lost_when_huge():
    """±inf d gives NaN ℓ (not ±C); a huge finite d gives exactly ±C (main: ℓ = d +
    (clamp(d) − d).detach() rounded 1e30 − 1e30 to ℓ = 0)."""
    lp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    olp = torch.tensor([[-1e30, -1.5]])
    loss, met = ref.policy_loss(lp, olp, None, None, "sapo")
    assert met["w_max"].item() == pytest.approx(math.exp(20.0), rel=1e-6)
    assert met["ppo_kl"].item() == pytest.approx(-(20.0 + 0.5) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    for v in (INF, -INF):
        _, met, g = run(torch.tensor([[v, -1.0]]), torch.tensor([[-1.0, -1.5]]), None, None, "ppo_clip")
        assert met["w_max"].isnan() and met["nonfinite_tokens"].item() == 1.0 and g[0, 0].isnan()


def test_masked_nonfinite_fully_isolated():
    lp, olp, A, mask = batch(B=4, T=6, seed=3)
    mask[3] = False
    for loss_type, opts in FAMILY_CONFIGS[::4]:
        clean = run(lp, olp, A, mask, loss_type, **opts)
        lp2, olp2, A2 = (torch.where(mask, t, torch.full_like(t, v)) for t, v in
                         ((lp, NAN), (olp, -INF), (A, INF)))
        dirty = run(lp2, olp2, A2, mask, loss_type, **opts)
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[2], dirty[2])
        assert all(torch.equal(clean[1][k], dirty[1][k]) for k in clean[1])
        assert dirty[1]["nonfinite_tokens"].item() == 0.0 and torch.all(dirty[2][~mask] == 0)


# ============================================================================ reference gradient overflow
def test_is_reshape_var_subnormal_gamma_gradient_finite():
    """γ_t = p4 = σ(−Tℓ)·σ(−T·A) ≈ 1e-40 (subnormal in fp32) with γ_base = 0: main gave −inf."""
    lp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    olp = torch.tensor([[-10.0, -0.5]])
    A = torch.tensor([[8.4, 1.0]])
    loss, met = ref.policy_loss(lp, olp, A, None, "is_reshape_var", gamma=0.0)
    assert 0 < met["gamma_min"].item() < torch.finfo(F32).tiny
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    gamma_t = torch.sigmoid(torch.tensor(-50.0, dtype=F64)) * torch.sigmoid(torch.tensor(-42.0, dtype=F64))
    assert lp.grad[0, 0].item() == pytest.approx(-0.5 * 8.4 * math.exp(10.0 * gamma_t.item()), rel=1e-6)


@pytest.mark.parametrize("gamma", [1e-40, 1e-44, 3e-45])
def test_is_reshape_tiny_fixed_gamma_value_and_gradient(gamma):
    """F = A·expm1(γℓ)/γ → A·ℓ; main: inf gradient at γ ≈ 1e-40 and a loss off by 50% at 1e-44."""
    lp, olp, A, mask = batch()
    loss, _, g = run(lp, olp, A, mask, gamma=gamma, gamma_min=0.0)
    m = mask.to(F64)
    ell = (lp.double() - olp.double()).clamp(-20, 20)
    expected = -(A.double() * ell * m).sum() / m.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(g, (-A * mask / mask.sum()), rtol=1e-6, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 1e-310, 1e-200, 1e-8, 0.37, 1.0, 1.7])
def test_expm1_over_exact_and_twice_differentiable(gamma):
    ell = torch.tensor([-20.0, -3.0, -1e-9, 0.0, 1e-7, 0.8, 20.0], dtype=F64, requires_grad=True)
    g = torch.tensor(gamma, dtype=F64)
    out = ref.expm1_over(g, ell)
    exact = torch.expm1(g * ell) / g if gamma >= 1e-8 else ell * (1 + g * ell / 2)
    torch.testing.assert_close(out, exact, rtol=4e-16, atol=0)
    torch.autograd.gradcheck(lambda e: ref.expm1_over(g, e), (ell,))
    torch.autograd.gradgradcheck(lambda e: ref.expm1_over(g, e), (ell,))
    (d,) = torch.autograd.grad(out.sum(), ell)
    torch.testing.assert_close(d, torch.exp(g * ell.detach()), rtol=1e-15, atol=0)


def test_expm1_over_is_the_plain_formula_for_normal_gamma_ell():
    ell = torch.linspace(-20, 20, 401)
    for gamma in (1e-30, 0.05, 0.3, 1.0, 1.99):
        g = torch.tensor(gamma)
        assert torch.equal(ref.expm1_over(g, ell), torch.expm1(g * ell) / g)


# ============================================================================ autograd rules
@pytest.mark.parametrize("loss_type", ["is_reshape", "ppo_clip", "vespo"])
def test_constant_inputs_requiring_grad_follow_autograd(loss_type):
    """old_log_prob and advantages are constants: a loss from a log_prob without grad does
    not require grad (autograd's RuntimeError on backward, no AttributeError), and no
    gradient reaches them."""
    lp, olp, A, mask = batch()
    olp.requires_grad_()
    A.requires_grad_()
    loss, _ = ref.policy_loss(lp, olp, A, mask, loss_type)
    assert not loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()
    lp.requires_grad_()
    loss, _ = ref.policy_loss(lp, olp, A, mask, loss_type)
    loss.backward()
    assert lp.grad is not None and olp.grad is None and A.grad is None


# ============================================================================ validation (SPEC §11)
FLOAT_PARAMS = [("is_reshape", "gamma"), ("is_reshape", "rho_min"), ("is_reshape", "gamma_max"),
                ("is_reshape_sign", "gamma_pos"), ("is_reshape_sign", "mm_tau"),
                ("is_reshape_tr", "tau_h"), ("is_reshape_var", "temperature"),
                ("ppo_clip", "clip_ratio_c"), ("ppo_clip", "clip_ratio_high"), ("sapo", "tau_pos"),
                ("vespo", "k_pos")]


@pytest.mark.parametrize("loss_type,name", FLOAT_PARAMS)
def test_params_outside_fp32_or_bool_rejected(loss_type, name):
    for value in (1e39, -1e39, 1e-50, -1e-300, INF, NAN):
        with pytest.raises(ValueError, match=name):
            make_params(loss_type, **{name: value})
    for value in (True, False, np.bool_(True), "0.5", torch.tensor(0.5)):
        if name == "gamma" and isinstance(value, str):
            continue
        with pytest.raises(TypeError, match=name):
            make_params(loss_type, **{name: value})


def test_numpy_scalars_accepted_and_stored_as_python_floats():
    lp, olp, A, mask = batch()
    base = ref.policy_loss(lp, olp, A, mask, "is_reshape", gamma=0.25, rho_min=0.5)[0]
    for g, r in ((np.float32(0.25), np.float64(0.5)), (np.float64(0.25), np.float32(0.5))):
        p = make_params("is_reshape", gamma=g, rho_min=r)
        assert type(p.gamma) is float and type(p.rho_min) is float
        assert torch.equal(ref.policy_loss(lp, olp, A, mask, "is_reshape", params=p)[0], base)
    p = make_params("sapo", tau_pos=np.int64(2), tau_neg=np.float32(0.5))
    assert (p.tau_pos, p.tau_neg) == (2.0, 0.5) and type(p.tau_pos) is float
    assert make_params("is_reshape", gamma=1e-44, gamma_min=0).gamma == 1e-44  # subnormal in fp32: kept
    assert AggConfig("token-sum", dp_size=np.int64(4)).dp_size == 4
    loss = ref.policy_loss(lp, olp, A, mask, "sapo", log_ratio_clamp=np.float32(5.0),
                           global_token_count=np.int32(7))[0]
    assert torch.isfinite(loss)
    for name, value in (("log_ratio_clamp", True), ("dp_size", True), ("global_token_count", True),
                        ("loss_scale_factor", np.bool_(False))):
        with pytest.raises(TypeError, match=name):
            ref.policy_loss(lp, olp, A, mask, **{name: value})
    for name, value in (("log_ratio_clamp", 1e39), ("global_batch_size", 1e39)):
        with pytest.raises(ValueError, match=name):
            ref.policy_loss(lp, olp, A, mask, **{name: value})


def test_unknown_option_errors_name_it_and_list_valid_ones():
    with pytest.raises(TypeError, match=r"'tau_pso'.*did you mean 'tau_pos'.*\['tau_neg', 'tau_pos'\]"):
        make_params("sapo", params=irt.SAPOParams(), tau_pso=2.0)  # main: a raw dataclass error
    with pytest.raises(TypeError, match=r"unknown option 'gama' for IsReshapeParams.*valid options"):
        irt.IsReshapeParams(gama=0.5)
    with pytest.raises(TypeError, match=r"'gama'.*valid options"):
        dataclasses.replace(irt.IsReshapeParams(), gama=0.5)
    with pytest.raises(TypeError, match=r"'dp_sise'.*did you mean 'dp_size'"):
        AggConfig("token-mean", dp_sise=2)
    lp, olp, A, mask = batch()
    with pytest.raises(TypeError, match=r"'dp_sise'.*did you mean 'dp_size'.*shared options"):
        ref.policy_loss(lp, olp, A, mask, dp_sise=2)
    # positional construction and pickling still work
    assert AggConfig("token-sum", 2).dp_size == 2
    import pickle
    p = irt.IsReshapeParams(gamma=0.4)
    assert pickle.loads(pickle.dumps(p)) == p


def test_count_tensors_accepted_without_reading_them():
    """global_token_count / global_batch_size as 0-dim tensors (SPEC §2): same loss, no sync
    (runs on the meta device, where reading a value would fail)."""
    lp, olp, A, mask = batch()
    for agg, name in (("token-mean", "global_token_count"), ("seq-mean-token-sum", "global_batch_size")):
        for value in (torch.tensor(9.0), torch.tensor(9), torch.tensor(9, dtype=torch.int32)):
            expected = ref.policy_loss(lp, olp, A, mask, "sapo", agg, **{name: 9.0})[0]
            got = ref.policy_loss(lp, olp, A, mask, "sapo", agg, **{name: value})[0]
            torch.testing.assert_close(got, expected)
        meta = [t.to("meta") for t in (lp, olp, A, mask)]
        loss, _ = ref.policy_loss(*meta, "sapo", agg, **{name: torch.tensor(9.0, device="meta")})
        assert loss.device.type == "meta"
        with pytest.raises(ValueError, match=name):
            ref.policy_loss(lp, olp, A, mask, "sapo", agg, **{name: torch.tensor([9.0])})
        with pytest.raises(TypeError, match=name):
            ref.policy_loss(lp, olp, A, mask, "sapo", agg, **{name: torch.tensor(True)})
        with pytest.raises(ValueError, match=name):
            ref.policy_loss(lp, olp, A, mask, "sapo", agg, **{name: torch.tensor(9.0, device="meta")})


def test_process_group_type_checked():
    lp, olp, A, mask = batch()
    with pytest.raises(TypeError, match="process_group"):
        irt.policy_loss(lp, olp, A, mask, process_group="x")
    with pytest.raises(TypeError, match="process_group"):
        irt.PolicyLoss("sapo", process_group="x")


@pytest.fixture
def reference_dispatch(monkeypatch):
    """``irt.policy_loss`` on the reference (the session runs under TRITON_INTERPRET=1)."""
    monkeypatch.setattr(irt.api, "uses_kernels", lambda t: False)


def test_policy_loss_module_per_call_overrides(reference_dispatch):
    lp, olp, A, mask = batch()
    module = irt.PolicyLoss("is_reshape", "token-mean", gamma=0.5, dp_size=2)
    for agg in AGG_MODES:
        got = module(lp, olp, A, mask, loss_agg_mode=agg)[0]  # main: "multiple values"
        assert torch.equal(got, ref.policy_loss(lp, olp, A, mask, "is_reshape", agg, gamma=0.5, dp_size=2)[0])
    got = module(lp, olp, A, mask, gamma=0.25, dp_size=1)[0]
    assert torch.equal(got, ref.policy_loss(lp, olp, A, mask, "is_reshape", gamma=0.25)[0])
    got = module(lp, olp, A, mask, params=irt.IsReshapeParams(gamma=0.75))[0]
    assert torch.equal(got, ref.policy_loss(lp, olp, A, mask, gamma=0.75, dp_size=2)[0])
    assert torch.equal(module(lp, olp, A, mask)[0], ref.policy_loss(lp, olp, A, mask, gamma=0.5, dp_size=2)[0])
    with pytest.raises(TypeError, match="loss_type"):
        module(lp, olp, A, mask, loss_type="sapo")
    with pytest.raises(TypeError, match="tau_pos"):
        module(lp, olp, A, mask, tau_pos=1.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        module(lp, olp, A, mask, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="dp_size"):
        irt.PolicyLoss("sapo", dp_size=0)  # validated when built


# ============================================================================ path divergences (reference side)
@pytest.mark.parametrize("loss_type", ["is_reshape", "is_reshape_sign", "is_reshape_var"])
@pytest.mark.parametrize("rule", ["ess", "ess_exact", "psis"])
def test_all_masked_sequence_gamma_metrics_are_zero(loss_type, rule):
    """Per-row γ metrics are token means over the counted tokens: 0 when there are none."""
    lp, olp, A, _ = batch()
    mask = torch.zeros(3, 5)
    loss, met, g = run(lp, olp, A, mask, loss_type, gamma=rule, gamma_granularity="sequence")
    assert loss.item() == 0.0 and torch.all(g == 0)
    for k, v in met.items():
        assert v.item() == 0.0, k


@pytest.mark.parametrize("loss_type", ["is_reshape_tr", "sapo"])
@pytest.mark.parametrize("ell", [1e-7, -1e-7, 3e-6])
def test_small_log_ratio_loss_value_accurate(loss_type, ell):
    """w − 1 = expm1(ℓ): the fp32 loss at |ℓ| = 1e-7 agrees with fp64 (the kernel's fp32
    w − 1 had 78% error)."""
    lp = torch.tensor([[ell, 0.5 * ell]])
    olp = torch.zeros(1, 2)
    A = torch.tensor([[1.3, -0.7]])
    l32, _ = ref.policy_loss(lp, olp, A, None, loss_type)
    l64, _ = ref.policy_loss(lp.double(), olp.double(), A.double(), None, loss_type)
    on_policy, _ = ref.policy_loss(olp.double(), olp.double(), A.double(), None, loss_type)
    # relative to the loss's change from ℓ = 0 (tr: the whole loss; sapo: F(0) = 2A/τ)
    assert abs(l32.double() - l64).item() <= 1e-5 * abs(l64 - on_policy).item() + 1e-7 * abs(on_policy).item()


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_mask_counts_nonzero(fp8):
    lp, olp, A, mask = batch()
    weights = torch.where(mask, 0.5, 0.0)
    a = run(lp, olp, A, weights.to(fp8), "is_reshape")
    b = run(lp, olp, A, mask, "is_reshape")
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


# ============================================================================ fuzz
MASK_KINDS = ("bool", "int", "float", "fp8", "none")
SIGN_KEYED = ("is_reshape_sign", "vespo", "gmpo")  # A enters their statistics (groups, a row's first A or ΣA)


def _locality(loss_type, opts):
    """'token': a token's φ depends on that token only (no statistics); 'row': on its row (per-row
    statistics); 'batch'."""
    fam = kernel_family(loss_type, irt.make_params(loss_type, **opts))
    if not (fam.needs_stats or fam.given):
        return "token"
    return "row" if fam.per_row else "batch"


@settings(max_examples=150)
@given(data=st.data())
def test_fuzz_nonfinite_policy(data):
    """Random batch and injections: NaN/±inf at counted tokens → NaN loss, NaN ℓ-metrics,
    NaN gradient there, nonfinite_tokens = the number of such tokens, and every token the
    bad statistics do not reach keeps its clean gradient; injections at masked positions
    only → the clean batch's loss, metrics and gradient, bit for bit; a bad count tensor
    (NaN, negative, ±inf) that the mode divides by → NaN loss and gradient at counted tokens."""
    draw = data.draw
    loss_type, opts = draw(st.sampled_from(FAMILY_CONFIGS))
    opts = dict(opts)
    if "rho_min" in {f.name for f in dataclasses.fields(irt.make_params(loss_type))}:
        opts["rho_min"] = draw(st.floats(0.05, 0.95))
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([F32, F64, torch.bfloat16, torch.float16]))
    adv_kind = draw(st.sampled_from(["BT", "B", "none"]))
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    agg = draw(st.sampled_from(AGG_MODES))
    clamp = draw(st.sampled_from([20.0, 3.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    olp = -3.0 * torch.rand(B, T, generator=g, dtype=F64)
    lp = (olp + draw(st.floats(0.05, 4.0)) * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
    olp = olp.to(dtype)
    A = torch.randn(B, T, generator=g, dtype=F64).to(dtype)
    counted = torch.rand(B, T, generator=g) > draw(st.floats(0.0, 0.8))
    if mask_kind == "none":
        counted[:] = True
    mask = {"bool": counted, "int": counted.to(torch.int32), "float": counted * 2.5,
            "fp8": counted.to(torch.float8_e4m3fn), "none": None}[mask_kind]
    A_in = {"BT": A, "B": A[:, 0].clone(), "none": None}[adv_kind]

    cells = [(b, t) for b in range(B) for t in range(T)]
    on = [c for c in cells if counted[c]]
    off = [c for c in cells if not counted[c]]
    hit = draw(st.lists(st.sampled_from(on), min_size=1, max_size=min(3, len(on)), unique=True)) if on else []
    masked_hit = (draw(st.lists(st.sampled_from(off), min_size=1, max_size=min(3, len(off)), unique=True))
                  if off else [])
    targets = ["log_prob", "old_log_prob"] + (["advantages"] if adv_kind == "BT" else [])
    event(f"{len(hit)} counted / {len(masked_hit)} masked injections")

    def injected(cells_):
        """The injected copies and the rows that got a bad log-prob (a NaN ℓ)."""
        lp2, olp2, A2 = lp.clone(), olp.clone(), None if A_in is None else A_in.clone()
        bad_ell_rows = torch.zeros(B, 1, dtype=torch.bool)
        for c in cells_:
            where = draw(st.sampled_from(targets))
            value = draw(st.sampled_from([NAN, INF, -INF]))
            {"log_prob": lp2, "old_log_prob": olp2, "advantages": A2}[where][c] = value
            bad_ell_rows[c[0]] |= where != "advantages"
        return lp2, olp2, A2, bad_ell_rows

    kw = dict(log_ratio_clamp=clamp, **opts)
    loss0, met0, g0 = run(lp, olp, A_in, mask, loss_type, agg, **kw)
    assert torch.isfinite(loss0) and all(torch.isfinite(v) for v in met0.values())
    assert met0["nonfinite_tokens"].item() == 0

    lp1, olp1, A1, _ = injected(masked_hit)
    loss1, met1, g1 = run(lp1, olp1, A1, mask, loss_type, agg, **kw)
    assert same(loss1, loss0) and same(g1, g0)
    assert all(same(met1[k], met0[k]) for k in met0)

    if agg != "token-sum" and draw(st.booleans()):  # a bad count tensor the mode divides by: loud
        name = "global_token_count" if agg == "token-mean" else "global_batch_size"
        value = torch.tensor(draw(st.sampled_from([NAN, -INF, INF, -1.0, -3])))
        loss3, met3, g3 = run(lp, olp, A_in, mask, loss_type, agg, **kw, **{name: value})
        assert loss3.isnan() and torch.all(g3[counted].isnan()) and torch.all(g3[~counted] == 0)
        assert met3["nonfinite_tokens"].item() == 0
    if not hit:
        return
    lp2, olp2, A2, bad_ell_rows = injected(hit)
    in_log_probs = bool(bad_ell_rows.any())
    for c in masked_hit:  # masked garbage on top
        lp2[c], olp2[c] = NAN, INF
    loss2, met2, g2 = run(lp2, olp2, A2, mask, loss_type, agg, **kw)
    bad = torch.zeros(B, T, dtype=torch.bool)
    for c in hit:
        bad[c] = True
    assert loss2.isnan()
    assert met2["nonfinite_tokens"].item() == len(hit)
    assert met2["token_count"].item() == counted.sum().item()
    assert all(met2[k].isnan() for k in PHI_METRICS + (ELL_METRICS if in_log_probs else ()))
    assert torch.all(g2[bad].isnan()) and torch.all(g2[~counted] == 0)
    # a bad A reaches only what A's sign keys: the sign family's groups (it leaves its group), VESPO's row
    a_keyed = loss_type in SIGN_KEYED or kernel_family(loss_type, irt.make_params(loss_type, **opts)).select_ratio
    locality = _locality(loss_type, opts) if in_log_probs or a_keyed else "token"  # a selection's Ā holds A
    if locality == "token":
        keep = counted & ~bad
    elif locality == "row":
        keep = counted & ~bad.any(dim=1, keepdim=True)
        if loss_type != "is_reshape_sign":  # a NaN ℓ reaches its row's statistic: every token of the row
            assert torch.all(g2[counted & bad_ell_rows].isnan())
    else:
        keep = torch.zeros_like(counted)
        if loss_type != "is_reshape_sign":
            assert torch.all(g2[counted].isnan())
    assert torch.equal(g2[keep], g0[keep])
