"""Tests of the pure-PyTorch reference ``irt.reference`` against the SPEC (§2-6).

The oracle below (``oracle``) re-derives φ, F, γ_t and the aggregation scale s
directly from the SPEC formulas in NumPy float64, without the reference's
helpers, so the reference is checked against an independent reading.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import isreshape_triton as irt
from isreshape_triton.metrics import metric_names
from isreshape_triton.families.is_reshape_sign import NEG_SATURATIONS, POS_WEIGHTS
from isreshape_triton.params import AGG_MODES, LOSS_TYPES, AggConfig, make_params

ref = irt.reference
F64 = torch.float64
HYP = settings(max_examples=6, deadline=None, derandomize=True)


# ============================================================================ inputs
def make_batch(B=3, T=6, seed=0, dtype=F64, adv="full", p_masked=0.3, scale=0.5):
    """Random (log_prob [requires grad], old_log_prob, advantages, mask)."""
    g = torch.Generator().manual_seed(seed)
    olp = -3.0 * torch.rand(B, T, generator=g, dtype=F64) - 0.05
    lp = olp + scale * torch.randn(B, T, generator=g, dtype=F64)
    A = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > p_masked
    if adv == "row":
        A = A[:, 0].clone()
    elif adv == "none":
        A = None
    lp = lp.to(dtype).requires_grad_()
    return lp, olp.to(dtype), None if A is None else A.to(dtype), mask


def banded_batch(B=3, T=6, seed=0, loss_type="is_reshape", zero_ell_neg=False):
    """fp64 inputs whose ℓ keeps away from every kink (clamp, PPO clip and dual clip,
    truncation at w^1.5 = 1.5) and from ℓ = 0, |A| ≥ 0.5.

    ``zero_ell_neg``: ℓ = 0 on A < 0 tokens (the soft saturation is a surrogate there:
    only at ℓ = 0 does its value's derivative equal φ). For vespo each row gets
    Σ_t m_t·A_t·ℓ_t = 0, the point where the surrogate's value derivative equals φ.
    """
    g = torch.Generator().manual_seed(seed)
    bands = torch.tensor([[0.03, 0.12], [0.3, 0.9], [1.3, 1.6]], dtype=F64)
    which = torch.randint(0, 3, (B, T), generator=g)
    lo, hi = bands[which, 0], bands[which, 1]
    mag = lo + (hi - lo) * torch.rand(B, T, generator=g, dtype=F64)
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0).to(F64)
    ell = sign * mag
    A = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0).to(F64) * (
        0.5 + 1.5 * torch.rand(B, T, generator=g, dtype=F64))
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, -1] = True
    if zero_ell_neg:
        ell = torch.where(A < 0, 0.0, ell)
    if loss_type == "vespo":  # make Σ_t m·A·ℓ = 0 per row through the last (counted) token
        A[:, -1] = 2.0
        rest = (mask[:, :-1] * A[:, :-1] * ell[:, :-1]).sum(-1)
        ell[:, -1] = -rest / A[:, -1]
    olp = -2.0 - torch.rand(B, T, generator=g, dtype=F64)
    lp = (olp + ell).requires_grad_()
    return lp, olp, A, mask


# ============================================================================ independent oracle
def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_var(x):
    x = np.asarray(x, dtype=np.float64)
    return float(np.var(x, ddof=1)) if x.size >= 2 else 0.0


def gamma_ess(var, rho, lo, hi):
    return hi if var < 1e-8 else min(max(math.sqrt(-math.log(rho) / var), lo), hi)


def grouped(ell, sel, granularity, fn):
    """fn(values of the group) for the batch, or per row ([R, 1])."""
    if granularity == "batch":
        return np.full((ell.shape[0], 1), fn(ell[sel]))
    return np.array([[fn(ell[b][sel[b]])] for b in range(ell.shape[0])])


# The families whose SPEC §4 formulas ``oracle`` restates. A family beyond SPEC §4 is a peer's
# loss, checked against the peer's own code (tests/test_integrations.py).
SPEC_FAMILIES = ("is_reshape", "is_reshape_sign", "is_reshape_tr", "is_reshape_var", "ppo_clip", "sapo", "vespo")


def oracle(loss_type, lp, olp, A, mask, opts, C=20.0):
    """(ℓ, m, A, φ, F, γ_t) in float64 NumPy from the SPEC formulas."""
    m = np.ones(lp.shape, bool) if mask is None else mask.numpy() != 0
    lp_, olp_ = lp.detach().double().numpy(), olp.double().numpy()
    d = np.where(m, lp_ - np.where(m, olp_, 0.0), 0.0)
    ell = np.clip(d, -C, C)
    if A is None:
        A = np.ones(lp.shape)
    else:
        A = A.double().numpy()
        A = np.broadcast_to(A[:, None], lp.shape) if A.ndim == 1 else A
    A = np.where(m, A, 0.0)
    w = np.exp(ell)
    gran = opts.get("gamma_granularity", "batch")
    rho = opts.get("rho_min", 0.3)
    ones = np.ones_like(ell)
    if loss_type == "is_reshape":
        gam = opts.get("gamma", "ess")
        lo, hi = opts.get("gamma_min", 0.05), opts.get("gamma_max", 1.0)
        g = (np.full_like(ell, min(max(gam, lo), hi)) if not isinstance(gam, str)
             else grouped(ell, m, gran, lambda x: gamma_ess(np_var(x), rho, lo, hi)) * ones)
        phi = w ** g * A
        F = A * np.where(g == 0, ell, np.expm1(g * ell) / np.where(g == 0, 1, g))
        return ell, m, A, phi, F, g
    if loss_type == "is_reshape_sign":
        def g_pos_rule(x):
            if x.size == 0:
                return 0.5
            v = np_var(x)
            return 0.99 if v < 1e-8 else min(max(math.sqrt(-math.log(rho) / v), 0.05), 0.99)

        def g_neg_rule(x):
            if x.size == 0:
                return 1.5
            v = np_var(x)
            return 1.99 if v < 1e-8 else min(max(1 + min(0.99, math.sqrt(-math.log(rho) / v)), 1.01), 1.99)
        gp = (opts["gamma_pos"] * ones if opts.get("gamma_pos") is not None
              else grouped(ell, m & (A > 0), gran, g_pos_rule) * ones)
        gn = (opts["gamma_neg"] * ones if opts.get("gamma_neg") is not None
              else grouped(ell, m & (A < 0), gran, g_neg_rule) * ones)
        tau = opts.get("mm_tau", 1.0)
        mm_b, mm_int = (1 + tau) * w / (tau + w), (1 + tau) * np.log((tau + w) / (tau + 1))
        if opts.get("pos_weight", "power") == "power":
            b_pos, int_pos = w ** gp, np.expm1(gp * ell) / gp
        else:
            b_pos, int_pos = mm_b, mm_int
        sat = opts.get("neg_saturation", "soft")
        if sat == "none":
            b_neg, int_neg = w ** gn, np.expm1(gn * ell) / gn
        elif sat == "soft":
            lam, wth = opts.get("saturation_lambda", 1.0), opts.get("saturation_w_th", 3.0)
            beta = sig(-lam * (w - wth))
            b_neg = beta * w ** gn + (1 - beta) * w
            int_neg = b_neg * ell  # surrogate
        elif sat == "truncate":
            M = opts.get("truncate_max", 10.0)
            b_neg = np.minimum(w ** gn, M)
            int_neg = np.where(w ** gn <= M, np.expm1(gn * ell) / gn,
                               (M - 1) / gn + M * (ell - np.log(M) / gn))
        else:
            b_neg, int_neg = mm_b, mm_int
        phi = np.where(A > 0, A * b_pos, np.where(A < 0, A * b_neg, 0.0))
        F = np.where(A > 0, A * int_pos, np.where(A < 0, A * int_neg, 0.0))
        return ell, m, A, phi, F, np.where(A >= 0, gp, gn)
    if loss_type == "is_reshape_tr":
        th, tc = opts.get("tau_h", 1.0), opts.get("tau_c", 1.0)
        gb, gm = opts.get("gamma_base", 0.1), opts.get("gamma_max", 0.9)
        gt = gb + (gm - gb) * sig(-A * ell / tc)
        phi = ((1 - gt) + gt * w / np.cosh(th * (w - 1) / 2) ** 2) * A
        F = A * ((1 - gt) * ell + gt * (2 / th) * np.tanh(th * (w - 1) / 2))
        return ell, m, A, phi, F, gt
    if loss_type == "is_reshape_var":
        gam = opts.get("gamma", "ess")
        lo, hi = opts.get("gamma_min", 0.0), opts.get("gamma_max", 1.0)
        gbase = (np.full_like(ell, min(max(gam, lo), hi)) if not isinstance(gam, str)
                 else grouped(ell, m, gran, lambda x: gamma_ess(np_var(x), rho, lo, hi)) * ones)
        T = opts.get("temperature", 5.0)
        p_hi, p_lo, p_pos, p_neg = sig(T * ell), sig(-T * ell), sig(T * A), sig(-T * A)
        gt = np.clip(gbase * (p_hi * p_neg + p_lo * p_pos) + p_lo * p_neg, 0, 1)
        phi = w ** gt * A
        F = A * np.where(gt == 0, ell, np.expm1(gt * ell) / np.where(gt == 0, 1, gt))
        return ell, m, A, phi, F, gt
    if loss_type == "ppo_clip":
        el, eh = opts.get("clip_ratio_low", 0.2), opts.get("clip_ratio_high", 0.2)
        c = opts.get("clip_ratio_c", 3.0)
        unc, clp = -A * w, -A * np.clip(w, 1 - el, 1 + eh)
        loss = np.maximum(unc, clp)
        active = unc >= clp
        if c is not None:
            dual = (A < 0) & (loss > -A * c)
            loss = np.where(dual, -A * c, loss)
            active &= ~dual
        return ell, m, A, np.where(active, A * w, 0.0), -loss, ones
    if loss_type == "sapo":
        tau = np.where(A > 0, opts.get("tau_pos", 1.0), opts.get("tau_neg", 1.05))
        phi = A * w / np.cosh(tau * (w - 1) / 2) ** 2
        return ell, m, A, phi, A * (4 / tau) * sig(tau * (w - 1)), ones
    if loss_type == "vespo":
        phi = np.zeros_like(ell)
        for b in range(ell.shape[0]):
            logW = np.clip((ell[b] * m[b]).sum(), -C, C)
            idx = np.flatnonzero(m[b])
            pos = idx.size == 0 or A[b, idx[0]] >= 0
            k, lam = ((opts.get("k_pos", 2.0), opts.get("lambda_pos", 3.0)) if pos
                      else (opts.get("k_neg", 3.0), opts.get("lambda_neg", 2.0)))
            phi[b] = np.exp(logW) ** k * np.exp(lam * (1 - np.exp(logW))) * A[b]
        return ell, m, A, phi, phi * ell, ones
    raise AssertionError(loss_type)


def oracle_scale(m, mode, dp=1, gtc=None, gbs=None, lsf=None):
    """s_t·m_t = ∂aggregate/∂L_t from SPEC §5."""
    mf = m.astype(np.float64)
    n_b = mf.sum(-1, keepdims=True)
    gtc = mf.sum() if gtc is None else gtc
    gbs = float((n_b > 0).sum()) if gbs is None else gbs
    lsf = m.shape[-1] if lsf is None else lsf
    div = lambda a, b: np.where(b != 0, a / np.where(b != 0, b, 1), 0.0)  # noqa: E731
    if mode == "token-mean":
        s = div(1.0, gtc)
    elif mode == "token-sum":
        s = 1.0
    elif mode == "seq-mean-token-sum":
        s = div(1.0, gbs)
    elif mode == "seq-mean-token-mean":
        s = div(div(1.0, n_b), gbs)
    else:
        s = div(div(1.0, gbs), lsf)
    return mf * s * dp


# ============================================================================ gradient == −s·m·φ
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_type", SPEC_FAMILIES)
@HYP
@given(seed=st.integers(0, 10_000), adv=st.sampled_from(["full", "row", "none"]),
       gran=st.sampled_from(["batch", "sequence"]), sat=st.sampled_from(NEG_SATURATIONS),
       pos_weight=st.sampled_from(POS_WEIGHTS), dp=st.sampled_from([1, 4]),
       dtype=st.sampled_from([F64, F64, torch.float32]))
def test_grad_and_value_match_spec(loss_type, agg, seed, adv, gran, sat, pos_weight, dp, dtype):
    lp, olp, A, mask = make_batch(B=4, T=7, seed=seed, dtype=dtype, adv=adv)
    opts = {}
    if loss_type in ("is_reshape", "is_reshape_sign", "is_reshape_var"):
        opts["gamma_granularity"] = gran
    if loss_type == "is_reshape_sign":
        opts.update(neg_saturation=sat, pos_weight=pos_weight)
    loss, metrics = ref.policy_loss(lp, olp, A, mask, loss_type, agg, dp_size=dp, **opts)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert grad.dtype == lp.dtype

    ell, m, Aa, phi, F, gt = oracle(loss_type, lp, olp, A, mask, opts)
    s = oracle_scale(m, agg, dp)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == F64 else dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad.double().numpy(), -s * phi, **tol)
    np.testing.assert_allclose(loss.item(), (-s * F).sum(), **tol)

    # metrics from their definitions (metrics.py)
    n = m.sum()
    mean = lambda x: (x * m).sum() / n  # noqa: E731
    w = np.exp(ell)
    om = np.where(m, np.exp(gt * ell - (gt * ell)[m].max()), 0.0)
    expect = {"token_count": n, "ppo_kl": mean(-ell), "w_mean": mean(w), "w_max": w[m].max(),
              "phi_mean": mean(phi), "phi_abs_max": np.abs(phi[m]).max(), "sigma_sq": np_var(ell[m]),
              "ess": om.sum() ** 2 / (om ** 2).sum(), "ess_ratio": om.sum() ** 2 / (om ** 2).sum() / n}
    if loss_type.startswith("is_reshape"):
        expect.update(gamma_mean=mean(gt), gamma_min=gt[m].min(), gamma_max=gt[m].max())
    if loss_type == "is_reshape" and gran == "batch":
        expect["gamma"] = gt[0, 0]
    expect.update(skewness=scipy.stats.skew(ell[m]), kurtosis=scipy.stats.kurtosis(ell[m]),
                  max_weight_ratio=w[m].max() / w[m].sum())
    if loss_type == "is_reshape_sign":
        expect.update(sigma_sq_pos=np_var(ell[m & (Aa > 0)]), sigma_sq_neg=np_var(ell[m & (Aa < 0)]))
        for name, sel in (("pos", m & (Aa > 0)), ("neg", m & (Aa < 0))):
            o = np.exp(gt[sel] * ell[sel])
            e = o.sum() ** 2 / (o ** 2).sum() if o.size else 0.0
            expect.update({f"ess_{name}": e, f"ess_ratio_{name}": e / o.size if o.size else 0.0})
    assert tuple(metrics) == metric_names(loss_type)
    for k, v in metrics.items():
        assert v.dim() == 0 and v.dtype == loss.dtype and v.device == lp.device, k
        assert torch.isfinite(v), k
        if k in expect:
            np.testing.assert_allclose(v.item(), expect[k], **tol, err_msg=k)


# ============================================================================ gradcheck
GRADCHECK_OPTS = {
    # detached statistics must be locally constant for a finite-difference check:
    # fixed γ, or a rule sitting on its clip bound, or saturated soft indicators
    # (a family not named here: its default options)
    "is_reshape": [{"gamma": 0.6}, {"gamma": 0.0, "gamma_min": 0.0},
                   {"gamma": "ess", "gamma_max": 0.7}, {"gamma": 0.3, "gamma_granularity": "sequence"}],
    "is_reshape_sign": [{"gamma_pos": 0.7, "gamma_neg": 1.5, "neg_saturation": "truncate",
                         "truncate_max": 1.5}],
    "is_reshape_tr": [{"tau_c": 1e-4}, {"tau_c": 1e-4, "tau_h": 2.0, "gamma_base": 0.3}],
    "is_reshape_var": [{"gamma": 0.4, "temperature": 1000.0},
                       {"gamma": 0.8, "temperature": 1000.0, "gamma_granularity": "sequence"}],
    "ppo_clip": [{}, {"clip_ratio_c": None}, {"clip_ratio_low": 0.3, "clip_ratio_high": 0.28}],
    "sapo": [{}, {"tau_pos": 2.0, "tau_neg": 0.5}],
    "vespo": [{}, {"k_pos": 1.0, "lambda_pos": 0.5, "k_neg": 0.5, "lambda_neg": 1.5}],
    "cispo": [{"clip_ratio_low": 0.0, "clip_ratio_high": 0.0}],  # sg(clip(w)) ≡ 1
    "dppo": [{"clip_ratio_c": 1e-3}, {"divergence": "kl", "clip_ratio_c": 1e-3}],  # sg(min(w, c)) ≡ c
    "gspo": [{"log_ratio_max": -5.0}],  # sg(s) clamped: s ≡ e⁻⁵
}
AGG_KW = {"token-mean": {"global_token_count": 40.0}, "seq-mean-token-sum": {"dp_size": 2},
          "seq-mean-token-sum-norm": {"loss_scale_factor": 7.0, "global_batch_size": 5.0}}


def _gradcheck(loss_type, agg, opts, seed, zero_ell_neg=False):
    lp, olp, A, mask = banded_batch(seed=seed, loss_type=loss_type, zero_ell_neg=zero_ell_neg)
    kw = AGG_KW.get(agg, {})
    fn = lambda x: ref.policy_loss(x, olp, A, mask, loss_type, agg, **kw, **opts)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (lp,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_family_x_agg(loss_type, agg):
    opts_list = GRADCHECK_OPTS.get(loss_type, [{}])
    i = AGG_MODES.index(agg)
    _gradcheck(loss_type, agg, opts_list[i % len(opts_list)], seed=i)


@pytest.mark.parametrize("pos_weight", POS_WEIGHTS)
@pytest.mark.parametrize("sat", NEG_SATURATIONS)
def test_gradcheck_sign_options(sat, pos_weight):
    opts = {"gamma_pos": 0.6, "gamma_neg": 1.5, "neg_saturation": sat, "pos_weight": pos_weight,
            "truncate_max": 1.5, "mm_tau": 0.7}
    agg = AGG_MODES[(NEG_SATURATIONS.index(sat) * 2 + POS_WEIGHTS.index(pos_weight)) % len(AGG_MODES)]
    _gradcheck("is_reshape_sign", agg, opts, seed=7, zero_ell_neg=(sat == "soft"))


def test_sign_default_gamma_rule_gradcheck():
    # small group variances → γ+ = 0.99, γ− = 1.99 on their bounds (locally constant)
    _gradcheck("is_reshape_sign", "token-mean", {"neg_saturation": "none"}, seed=3)


# ============================================================================ hand-computed F, φ
def _terms(loss_type, ell, adv, params=None, **stats):
    t = ref.phi_F(loss_type, torch.tensor(ell, dtype=F64), torch.tensor(adv, dtype=F64),
                  params, **stats)
    return t.phi.item(), t.F.item()


LN2, LN3, LN4, LN9 = math.log(2), math.log(3), math.log(4), math.log(9)


def test_hand_is_reshape():
    # γ=0.5, ℓ=ln 2, A=2: φ = 2^0.5·2 = 2.828427; F = 2·(√2−1)/0.5 = 1.656854
    assert _terms("is_reshape", LN2, 2.0, gamma=0.5) == pytest.approx((2.8284271247461903, 1.6568542494923806))
    # γ=0 (weighted SFT): φ = A = 2, F = A·ℓ = 2·ln 2 = 1.386294
    assert _terms("is_reshape", LN2, 2.0, gamma=0.0) == pytest.approx((2.0, 1.3862943611198906))
    # γ=1 (plain IS): ℓ=ln 3, A=-1: φ = −3; F = −(3−1)/1 = −2
    assert _terms("is_reshape", LN3, -1.0, gamma=1.0) == pytest.approx((-3.0, -2.0))


def test_hand_is_reshape_gamma_rule():
    # ℓ = (0, 3): mean 1.5, σ² = (1.5² + 1.5²)/(2−1) = 4.5;
    # γ = √(−ln 0.3 / 4.5) = √(1.2039728043/4.5) = √0.2675495121 = 0.5172518...
    lp = torch.tensor([[0.0, 3.0]], dtype=F64, requires_grad=True)
    _, met = ref.policy_loss(lp, torch.zeros(1, 2, dtype=F64))
    assert met["sigma_sq"].item() == pytest.approx(4.5)
    assert met["gamma"].item() == pytest.approx(0.51725188, abs=1e-8)
    # ℓ = (0, 1): σ² = 0.5, √(1.204/0.5) = 1.55 → clipped to γ_max = 1
    _, met = ref.policy_loss(torch.tensor([[0.0, 1.0]], dtype=F64), torch.zeros(1, 2, dtype=F64))
    assert met["gamma"].item() == 1.0
    # a single token: σ² = 0 → γ_max
    _, met = ref.policy_loss(torch.tensor([[0.7]], dtype=F64), torch.zeros(1, 1, dtype=F64), gamma_max=0.8)
    assert met["gamma"].item() == 0.8 and met["sigma_sq"].item() == 0.0


def test_hand_is_reshape_sign():
    P = irt.IsReshapeSignParams
    s = dict(gamma_pos=0.5, gamma_neg=1.5)
    # power, A=1, ℓ=ln 4: φ = 4^0.5 = 2; F = (4^0.5 − 1)/0.5 = 2
    assert _terms("is_reshape_sign", LN4, 1.0, P(), **s) == pytest.approx((2.0, 2.0))
    # none, A=−1, ℓ=ln 4: φ = −4^1.5 = −8; F = −(8 − 1)/1.5 = −4.666667
    assert _terms("is_reshape_sign", LN4, -1.0, P(neg_saturation="none"), **s) == pytest.approx((-8.0, -7 / 1.5))
    # truncate M=10, A=−1: ℓ=ln 4 → w^1.5 = 8 ≤ 10: same as "none"
    assert _terms("is_reshape_sign", LN4, -1.0, P(neg_saturation="truncate"), **s) == pytest.approx((-8.0, -7 / 1.5))
    # ℓ=ln 9 → w^1.5 = 27 > 10: φ = −10; F = −[(10−1)/1.5 + 10·(ln 9 − ln 10/1.5)]
    #   = −[6 + 10·(2.1972246 − 1.5350567)] = −12.621678
    assert _terms("is_reshape_sign", LN9, -1.0, P(neg_saturation="truncate"), **s) == pytest.approx(
        (-10.0, -12.621678486735224))
    # Michaelis-Menten τ=1, A=−1, ℓ=ln 3: φ = −2·3/(1+3) = −1.5; F = −2·ln(4/2) = −1.386294
    assert _terms("is_reshape_sign", LN3, -1.0, P(neg_saturation="michaelis_menten"), **s) == pytest.approx(
        (-1.5, -1.3862943611198906))
    # ... and for A>0 with pos_weight="michaelis_menten", A=2: φ = 3, F = 2.772589
    assert _terms("is_reshape_sign", LN3, 2.0, P(pos_weight="michaelis_menten"), **s) == pytest.approx(
        (3.0, 2.772588722239781))
    # soft λ=1, w_th=3, A=−2, ℓ=ln 3 (w = 3): β = σ(0) = 0.5, b = 0.5·3^1.5 + 0.5·3 = 4.098076;
    #   φ = −8.196152; surrogate F = φ·ℓ = −8.196152·1.098612 = −9.004394
    assert _terms("is_reshape_sign", LN3, -2.0, P(), **s) == pytest.approx((-8.196152422706632, -9.004393771382405))
    # A = 0: φ = F = 0
    assert _terms("is_reshape_sign", LN3, 0.0, P(), **s) == (0.0, 0.0)


def test_hand_is_reshape_sign_gammas():
    # A>0 tokens ℓ = (0, 2): σ²₊ = 2 → γ+ = √(1.2039728/2) = 0.775878; A<0 tokens ℓ = (0, 0.5):
    # σ²₋ = 0.125 → √(9.63178) = 3.1035 → min(0.99, ·) → γ− = 1.99
    lp = torch.tensor([[0.0, 2.0, 0.0, 0.5]], dtype=F64)
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
    _, met = ref.policy_loss(lp, torch.zeros_like(lp), A, loss_type="is_reshape_sign")
    assert met["gamma_pos"].item() == pytest.approx(0.7758778, abs=1e-6)
    assert met["gamma_neg"].item() == pytest.approx(1.99)
    assert met["sigma_sq_pos"].item() == pytest.approx(2.0)
    assert met["sigma_sq_neg"].item() == pytest.approx(0.125)
    # no negative tokens → γ− = 1.5; a single positive token → σ²₊ = 0 → 0.99
    _, met = ref.policy_loss(lp[:, :1], torch.zeros(1, 1, dtype=F64), A[:, :1], loss_type="is_reshape_sign")
    assert (met["gamma_pos"].item(), met["gamma_neg"].item()) == (0.99, 1.5)
    # no tokens at all → (0.5, 1.5)
    _, met = ref.policy_loss(lp, torch.zeros_like(lp), A, torch.zeros_like(lp), loss_type="is_reshape_sign")
    assert (met["gamma_pos"].item(), met["gamma_neg"].item()) == (0.5, 1.5)


def test_hand_is_reshape_tr():
    P = irt.IsReshapeTRParams
    # ℓ=0, A=1: γ_t = 0.1 + 0.8·σ(0) = 0.5; φ = 0.5 + 0.5·1·sech²(0) = 1; F = 0
    assert _terms("is_reshape_tr", 0.0, 1.0, P()) == pytest.approx((1.0, 0.0))
    # ℓ=ln 2, A=1: γ_t = 0.1 + 0.8·σ(−ln 2) = 0.1 + 0.8/3 = 0.366667; sech²(0.5) = 0.786448
    #   φ = 0.633333 + 0.366667·2·0.786448 = 1.210062
    #   F = 0.633333·ln 2 + 0.366667·2·tanh(0.5) = 0.438993 + 0.733333·0.462117 = 0.777879
    assert _terms("is_reshape_tr", LN2, 1.0, P()) == pytest.approx((1.21006167084168, 0.7778791296786391))
    # ℓ=ln 2, A=−1, τ_h=2: γ_t = 0.1 + 0.8·σ(ln 2) = 0.633333; sech²(1) = 0.419974, tanh(1) = 0.761594
    #   φ = −[0.366667 + 0.633333·2·0.419974] = −0.898634
    #   F = −[0.366667·ln 2 + 0.633333·(2/2)·0.761594] = −0.736497
    assert _terms("is_reshape_tr", LN2, -1.0, P(tau_h=2.0)) == pytest.approx((-0.898634166044433, -0.7364969316439643))


def test_hand_is_reshape_var():
    # γ_base=0.5, T=5, ℓ=ln 2, A=1: p_hi = σ(5 ln 2) = 32/33, p_lo = 1/33, p_pos = σ(5) = 0.993307, p_neg = σ(−5)
    #   p2 = 32/33·0.006693 = 0.006490, p3 = 1/33·0.993307 = 0.030100, p4 = 1/33·0.006693 = 0.000203
    #   γ_t = 0.5·(0.006490 + 0.030100) + 0.000203 = 0.018498
    #   φ = 2^0.018498 = 1.012904; F = expm1(0.018498·ln 2)/0.018498 = 0.697610
    t = ref.phi_F("is_reshape_var", torch.tensor(LN2, dtype=F64), torch.tensor(1.0, dtype=F64), gamma_base=0.5)
    assert t.gamma_t.item() == pytest.approx(0.018497940613657567)
    assert (t.phi.item(), t.F.item()) == pytest.approx((1.0129043470438033, 0.6976099293061632))
    assert t.extras["p_case2"].item() == pytest.approx(0.006490037259912588)
    # ℓ=−ln 2, A=−1: p2 = σ(−5 ln 2)·σ(5) = 0.030100, p3 = 0.006490, p4 = 32/33·0.993307 = 0.963207
    #   γ_t = 0.5·0.036590 + 0.963207 = 0.981502; φ = −0.5^0.981502 = −0.506452;
    #   F = −expm1(−0.981502·ln 2)/0.981502 = 0.502850
    assert _terms("is_reshape_var", -LN2, -1.0, gamma_base=0.5) == pytest.approx(
        (-0.5064521735219015, 0.5028495067923502))


def test_hand_ppo_clip():
    ln = math.log
    # A=1, w=1.5: max(−1.5, −1.2) = −1.2 (clipped) → F = 1.2, φ = 0
    assert _terms("ppo_clip", ln(1.5), 1.0) == pytest.approx((0.0, 1.2))
    # A=−1, w=1.5: max(1.5, 1.2) = 1.5 < c = 3 → F = −1.5, φ = A·w = −1.5
    assert _terms("ppo_clip", ln(1.5), -1.0) == pytest.approx((-1.5, -1.5))
    # A=−1, w=4: max(4, 1.2) = 4 > 3 → dual clip: loss 3 → F = −3, φ = 0
    assert _terms("ppo_clip", ln(4.0), -1.0) == pytest.approx((0.0, -3.0))
    # ... without dual clip: F = −4, φ = −4
    assert _terms("ppo_clip", ln(4.0), -1.0, irt.PPOClipParams(clip_ratio_c=None)) == pytest.approx((-4.0, -4.0))
    # A=1, w=0.5: max(−0.5, −0.8) = −0.5 → F = 0.5, φ = 0.5
    assert _terms("ppo_clip", ln(0.5), 1.0) == pytest.approx((0.5, 0.5))
    # A=−2, w=0.5: max(1, 1.6) = 1.6 (clipped) → F = −1.6, φ = 0
    assert _terms("ppo_clip", ln(0.5), -2.0) == pytest.approx((0.0, -1.6))


def test_hand_sapo():
    # A=1, τ=1, w=2: φ = 2·sech²(0.5) = 2·0.786448 = 1.572895; F = 4·σ(1) = 4·0.731059 = 2.924234
    assert _terms("sapo", LN2, 1.0) == pytest.approx((1.572895465931855, 2.9242343145200196))
    # A=−1, τ_neg=1.05, w=0.5: φ = −0.5·sech²(−0.2625) = −0.467070; F = −(4/1.05)·σ(−0.525) = −1.415938
    assert _terms("sapo", -LN2, -1.0) == pytest.approx((-0.46706991164269634, -1.4159383303033666))


@pytest.mark.parametrize("loss_type, params", [
    ("sapo", {}), ("sapo", {"tau_neg": 2.0}),
    ("is_reshape_tr", {"gamma_base": 1.0, "gamma_max": 1.0, "tau_h": 0.5}),  # γ_t = 1: the tanh part alone
])
def test_saturated_gradient_keeps_its_digits(loss_type, params):
    """Where σ or tanh saturates (τ(w−1) up to 40), the fp32 reference's gradient keeps the digits
    that fp32's w − 1 allows (relative error ≈ τ(w−1)·2⁻²⁴) against float64 on the same inputs;
    autograd's σ·(1 − σ) or 1 − tanh² gives 0 there."""
    ell64 = torch.tensor([2.0, 3.0, 3.6, 3.7, -1e-3, 0.5]).to(F64)  # fp32 values
    adv64 = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0], dtype=F64)
    grads = []
    for dtype in (torch.float32, F64):
        ell = ell64.to(dtype).requires_grad_()
        ref.phi_F(loss_type, ell, adv64.to(dtype), make_params(loss_type, **params)).F.sum().backward()
        grads.append(ell.grad.to(F64))
    assert (grads[1].abs() > 0).all() and (grads[1].abs() < 1e-5).sum() >= 2  # saturated, not 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=0)


def test_hand_vespo():
    # log W = ln 2, (k, λ) = (2, 3): φ(W) = 2²·e^{3(1−2)} = 4e^{−3} = 0.199148; A=1, ℓ=0.3: F = 0.059744
    t = ref.phi_F("vespo", torch.tensor(0.3, dtype=F64), torch.tensor(1.0, dtype=F64),
                  log_W=torch.tensor(LN2, dtype=F64), first_adv=torch.tensor(1.0, dtype=F64))
    assert (t.phi.item(), t.F.item()) == pytest.approx((0.19914827347145578, 0.05974448204143673))
    # through policy_loss: a row with ℓ = (0.3, ln 2 − 0.3), A = (1, 0.5), token-sum: grad = −φ(2)·A
    lp = torch.tensor([[0.3, LN2 - 0.3]], dtype=F64, requires_grad=True)
    A = torch.tensor([[1.0, 0.5]], dtype=F64)
    loss, _ = ref.policy_loss(lp, torch.zeros_like(lp), A, loss_type="vespo", loss_agg_mode="token-sum")
    loss.backward()
    torch.testing.assert_close(lp.grad, -4 * math.exp(-3) * A)
    # first counted A < 0 → (k, λ) = (3, 2): φ(2) = 8e^{−2} = 1.082682, times A_t
    A2 = torch.tensor([[-1.0, 0.5]], dtype=F64)
    lp.grad = None
    loss, _ = ref.policy_loss(lp, torch.zeros_like(lp), A2, loss_type="vespo", loss_agg_mode="token-sum")
    loss.backward()
    torch.testing.assert_close(lp.grad, -8 * math.exp(-2) * A2)


# ============================================================================ aggregation
@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_literal_and_scale(agg):
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64, requires_grad=True)
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    # Σ L·m = 1+2+7+8+9 = 27, Σm = 5, rows with tokens = 2, row sums 3 and 24, n_b = 2 and 3, T = 3
    expect = {"token-mean": 27 / 5, "token-sum": 27.0, "seq-mean-token-sum": 27 / 2,
              "seq-mean-token-mean": (3 / 2 + 24 / 3) / 2, "seq-mean-token-sum-norm": 27 / 2 / 3}[agg]
    out = ref.aggregate(L, m, AggConfig(agg))
    assert out.item() == pytest.approx(expect)
    (g,) = torch.autograd.grad(out, L)
    torch.testing.assert_close(g, ref.agg_scale(m, AggConfig(agg)))
    # dp / global options
    cfg = AggConfig(agg, dp_size=3, global_token_count=10.0, global_batch_size=4.0, loss_scale_factor=6.0)
    expect = {"token-mean": 27 / 10 * 3, "token-sum": 27.0 * 3, "seq-mean-token-sum": 27 / 4 * 3,
              "seq-mean-token-mean": (3 / 2 + 24 / 3) / 4 * 3, "seq-mean-token-sum-norm": 27 / 4 / 6 * 3}[agg]
    assert ref.aggregate(L, m, cfg).item() == pytest.approx(expect)
    np.testing.assert_allclose(ref.agg_scale(m, cfg).numpy(),
                               oracle_scale(m.numpy(), agg, 3, 10.0, 4.0, 6.0))
    # zero denominators → 0, never NaN
    zero = AggConfig(agg, global_token_count=0.0, global_batch_size=0.0, loss_scale_factor=0.0)
    out = ref.aggregate(L, m, zero)
    assert torch.isfinite(out) and (agg == "token-sum" or out.item() == 0.0)


# ============================================================================ masking, empty input
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_garbage_changes_nothing(loss_type):
    lp, olp, A, mask = make_batch(B=4, T=6, seed=11, p_masked=0.4)
    mask[0] = False  # an empty row too
    bad_vals = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=F64)
    idx = torch.arange(lp.numel()).reshape(lp.shape) % 4
    garbage = bad_vals[idx]
    lp2 = torch.where(mask, lp.detach(), garbage).requires_grad_()
    olp2 = torch.where(mask, olp, garbage.flip(-1))
    A2 = torch.where(mask, A, garbage)
    for agg in AGG_MODES:
        l1, m1 = ref.policy_loss(lp, olp, A, mask, loss_type, agg)
        l2, m2 = ref.policy_loss(lp2, olp2, A2, mask.to(torch.float32) * 3.0, loss_type, agg)  # mask binarized
        (g1,) = torch.autograd.grad(l1, lp)
        (g2,) = torch.autograd.grad(l2, lp2)
        assert torch.equal(l1, l2)
        assert torch.equal(g1, g2)
        assert torch.all(g2[~mask] == 0)
        for k in m1:
            assert torch.equal(m1[k], m2[k]), k


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape,all_masked", [((0, 5), False), ((3, 0), False), ((3, 5), True),
                                              ((2, 0, 4), False)])
def test_empty_and_all_masked(loss_type, shape, all_masked):
    for agg in AGG_MODES:
        for dtype in (torch.float32, F64):
            lp = torch.full(shape, math.nan, dtype=dtype).requires_grad_()
            olp = torch.full(shape, math.nan, dtype=dtype)
            A = torch.full(shape, math.nan, dtype=dtype)
            mask = torch.zeros(shape, dtype=torch.bool) if all_masked else torch.ones(shape, dtype=torch.bool)
            opts = {"gamma_granularity": "sequence"} if (
                loss_type in ("is_reshape", "is_reshape_sign", "is_reshape_var") and dtype == F64) else {}
            loss, met = ref.policy_loss(lp, olp, A, mask, loss_type, agg, **opts)
            (g,) = torch.autograd.grad(loss, lp)
            assert loss.dim() == 0 and loss.item() == 0.0 and loss.dtype == dtype
            assert g.shape == lp.shape and torch.all(g == 0)
            assert tuple(met) == metric_names(loss_type)
            for k, v in met.items():
                assert v.dim() == 0 and torch.isfinite(v) and v.dtype == dtype, k
            assert met["token_count"].item() == 0.0


# ============================================================================ σ² accuracy, ess_exact
def test_sigma_sq_accurate_large_mean():
    g = torch.Generator().manual_seed(0)
    ell = 5.0 + 1e-3 * torch.randn(1000, 1000, generator=g, dtype=F64)
    lp = ell.to(torch.float32)
    _, met = ref.policy_loss(lp, torch.zeros_like(lp))
    exact = np.var(lp.double().numpy(), ddof=1)
    assert met["sigma_sq"].dtype == torch.float32
    assert abs(met["sigma_sq"].item() - exact) <= 1e-3 * exact


def grid_gamma(ell, lo, hi, rho, n_grid=20001):
    """Brute force: the largest grid γ ∈ [lo, hi] with ESS_γ/n ≥ ρ (float64)."""
    ell = np.asarray(ell, dtype=np.float64)
    if ell.size == 0:
        return None
    grid = np.linspace(lo, hi, n_grid)
    z = grid[:, None] * ell[None, :]
    om = np.exp(z - z.max(1, keepdims=True))
    ratio = om.sum(1) ** 2 / (om ** 2).sum(1) / ell.size
    ok = np.flatnonzero(ratio >= rho)
    return lo if ok.size == 0 else grid[ok.max()]


# interior γ: (1.5, 0.3), (2.5, 0.5), (3.0, 0.8); upper bound: (0.3, 0.3); γ_min fails: (4.0, 0.99)
@pytest.mark.parametrize("scale,rho", [(1.5, 0.3), (2.5, 0.5), (3.0, 0.8), (0.3, 0.3), (4.0, 0.99)])
def test_ess_exact_matches_grid(scale, rho):
    lp, olp, A, mask = make_batch(B=5, T=40, seed=int(scale * 10), scale=scale)
    ell = (lp.detach() - olp).numpy()
    m = mask.numpy()
    # is_reshape: one γ for the batch
    _, met = ref.policy_loss(lp, olp, A, mask, gamma="ess_exact", rho_min=rho)
    assert abs(met["gamma"].item() - grid_gamma(ell[m], 0.05, 1.0, rho)) <= 1e-3
    # is_reshape_var: γ_base on [0, 1]
    _, met = ref.policy_loss(lp, olp, A, mask, "is_reshape_var", gamma="ess_exact", rho_min=rho)
    assert abs(met["gamma_base"].item() - grid_gamma(ell[m], 0.0, 1.0, rho)) <= 1e-3
    # is_reshape_sign: γ+ on the A>0 group in [0.05, 0.99]; γ− = 1 + δ, δ ∈ [0.01, 0.99] on A<0
    _, met = ref.policy_loss(lp, olp, A, mask, "is_reshape_sign", gamma="ess_exact", rho_min=rho)
    a = A.numpy()
    assert abs(met["gamma_pos"].item() - grid_gamma(ell[m & (a > 0)], 0.05, 0.99, rho)) <= 1e-3
    assert abs(met["gamma_neg"].item() - 1 - grid_gamma(ell[m & (a < 0)], 0.01, 0.99, rho)) <= 1e-3
    # per row ("sequence"), through the helper
    ell_t = torch.where(mask, lp.detach() - olp, 0.0)
    rows = ref.select_gamma("ess_exact", ell_t, mask, (1,), rho_min=rho, gamma_min=0.05,
                            gamma_max=1.0, empty_value=1.0)
    for b in range(ell.shape[0]):
        assert abs(rows[b, 0].item() - grid_gamma(ell[b][m[b]], 0.05, 1.0, rho)) <= 1e-3


def test_ess_exact_sequence_metrics_and_empty_rows():
    lp, olp, A, mask = make_batch(B=3, T=30, seed=5, scale=2.0)
    mask[1] = False
    _, met = ref.policy_loss(lp, olp, A, mask, gamma="ess_exact", gamma_granularity="sequence")
    ell, m = (lp.detach() - olp).numpy(), mask.numpy()
    g = [grid_gamma(ell[b][m[b]], 0.05, 1.0, 0.3) for b in (0, 2)]
    n0, n2 = m[0].sum(), m[2].sum()
    assert met["gamma"].item() == pytest.approx((g[0] * n0 + g[1] * n2) / (n0 + n2), abs=1e-3)
    assert met["gamma_min"].item() == pytest.approx(min(g), abs=1e-3)


# ============================================================================ diagnostics (metrics.py)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("loss_type", ["is_reshape", "ppo_clip"])
def test_skew_kurtosis_match_scipy_on_counted_tokens(loss_type, dtype):
    lp, olp, A, mask = make_batch(B=6, T=50, seed=21, dtype=dtype, scale=1.3)
    lp = lp.detach().clone()
    lp[~mask] = 40.0  # masked positions must not enter the moments
    lp.requires_grad_()
    _, met = ref.policy_loss(lp, olp, A, mask, loss_type)
    dt = lp.dtype
    ell = (lp.detach().to(dt) - olp.to(dt)).clamp(-20, 20).double().numpy()[mask.numpy()]
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(met["skewness"].item(), scipy.stats.skew(ell), **tol)
    np.testing.assert_allclose(met["kurtosis"].item(), scipy.stats.kurtosis(ell), **tol)
    np.testing.assert_allclose(met["max_weight_ratio"].item(), np.exp(ell).max() / np.exp(ell).sum(), **tol)


def test_skew_kurtosis_degenerate():
    # constant ℓ (m2 = 0; scipy gives NaN): 0; one token: 0; empty: 0
    lp = torch.full((3, 7), -1.0, dtype=F64, requires_grad=True)
    olp = torch.full((3, 7), -1.1, dtype=F64)
    one = torch.zeros(3, 7, dtype=torch.bool)
    one[1, 2] = True
    for mask in (None, one, torch.zeros(3, 7, dtype=torch.bool)):
        _, met = ref.policy_loss(lp, olp, None, mask)
        assert met["skewness"].item() == 0.0 and met["kurtosis"].item() == 0.0
    # two values: skew 0, excess kurtosis −2 (scipy)
    lp2 = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=F64, requires_grad=True)
    _, met = ref.policy_loss(lp2, torch.zeros(1, 4, dtype=F64))
    assert met["skewness"].item() == pytest.approx(0.0, abs=1e-12)
    assert met["kurtosis"].item() == pytest.approx(-2.0)


def test_max_weight_ratio_by_hand():
    # w = 1, 2, 3 counted (a huge masked weight is ignored): max/Σ = 3/6
    lp = torch.tensor([[0.0, math.log(2.0)], [math.log(3.0), 15.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    _, met = ref.policy_loss(lp, torch.zeros(2, 2, dtype=F64), None, mask, "sapo")
    assert met["max_weight_ratio"].item() == pytest.approx(0.5, rel=1e-12)
    # clamped ℓ: w = e^20 dominates
    lp = torch.tensor([[30.0, 0.0]], dtype=F64, requires_grad=True)
    _, met = ref.policy_loss(lp, torch.zeros(1, 2, dtype=F64), None, None, "sapo")
    assert met["max_weight_ratio"].item() == pytest.approx(math.exp(20) / (math.exp(20) + 1), rel=1e-12)
    _, met = ref.policy_loss(lp, torch.zeros(1, 2, dtype=F64), None, torch.zeros(1, 2), "sapo")
    assert met["max_weight_ratio"].item() == 0.0


def test_sign_group_ess_by_hand():
    # A>0 tokens ℓ = 0, ln 4 with γ+ = 0.5: ω = 1, 2 → ess = 9/5;
    # A<0 tokens ℓ = 0, ln 2, ln 2 with γ− = 2: ω = 1, 4, 4 → ess = 81/33; A = 0 token in neither
    ell = torch.tensor([[0.0, math.log(4.0), 0.0, math.log(2.0), math.log(2.0), 1.0, 5.0]], dtype=F64)
    A = torch.tensor([[1.0, 2.0, -1.0, -0.5, -2.0, 0.0, -1.0]], dtype=F64)
    mask = torch.tensor([[True] * 6 + [False]])
    lp = ell.clone().requires_grad_()
    _, met = ref.policy_loss(lp, torch.zeros_like(ell), A, mask, "is_reshape_sign",
                             gamma_pos=0.5, gamma_neg=2.0)
    assert met["ess_pos"].item() == pytest.approx(9 / 5, rel=1e-12)
    assert met["ess_ratio_pos"].item() == pytest.approx(9 / 10, rel=1e-12)
    assert met["ess_neg"].item() == pytest.approx(81 / 33, rel=1e-12)
    assert met["ess_ratio_neg"].item() == pytest.approx(81 / 99, rel=1e-12)
    # an empty group gives 0
    _, met = ref.policy_loss(lp, torch.zeros_like(ell), A.abs(), mask, "is_reshape_sign")
    assert met["ess_neg"].item() == 0.0 and met["ess_ratio_neg"].item() == 0.0
    assert met["ess_pos"].item() > 0


# ============================================================================ shapes, layouts
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_row_advantages_broadcast(loss_type):
    lp, olp, A, mask = make_batch(B=4, T=5, seed=2, adv="row")
    l1, m1 = ref.policy_loss(lp, olp, A, mask, loss_type, "seq-mean-token-mean")
    l2, m2 = ref.policy_loss(lp, olp, A[:, None].expand(4, 5), mask, loss_type, "seq-mean-token-mean")
    g1, g2 = (torch.autograd.grad(x, lp)[0] for x in (l1, l2))
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_leading_shape_and_non_contiguous(loss_type):
    lp, olp, A, mask = make_batch(B=6, T=5, seed=4)
    base_l, base_m = ref.policy_loss(lp, olp, A, mask, loss_type, "seq-mean-token-sum")
    (base_g,) = torch.autograd.grad(base_l, lp)
    # [2, 3, T] leading shape
    lp3 = lp.detach().reshape(2, 3, 5).requires_grad_()
    l3, m3 = ref.policy_loss(lp3, olp.reshape(2, 3, 5), A.reshape(2, 3, 5), mask.reshape(2, 3, 5),
                             loss_type, "seq-mean-token-sum")
    (g3,) = torch.autograd.grad(l3, lp3)
    assert g3.shape == (2, 3, 5)
    torch.testing.assert_close(l3, base_l, rtol=0, atol=0)
    torch.testing.assert_close(g3.reshape(6, 5), base_g, rtol=0, atol=0)
    # non-contiguous: transposed storage
    lpt = lp.detach().t().contiguous().t().requires_grad_()
    olpt, At, maskt = (x.t().contiguous().t() for x in (olp, A, mask))
    assert not lpt.is_contiguous()
    lt, mt = ref.policy_loss(lpt, olpt, At, maskt, loss_type, "seq-mean-token-sum")
    (gt,) = torch.autograd.grad(lt, lpt)
    torch.testing.assert_close(lt, base_l, rtol=1e-14, atol=0)
    torch.testing.assert_close(gt, base_g, rtol=1e-14, atol=0)
    for k in base_m:
        torch.testing.assert_close(m3[k], base_m[k], rtol=0, atol=0)
        torch.testing.assert_close(mt[k], base_m[k], rtol=1e-14, atol=1e-300)


def test_inputs_not_modified_and_low_precision():
    for dtype in (torch.bfloat16, torch.float16):
        lp, olp, A, mask = make_batch(B=3, T=8, seed=9, dtype=dtype)
        copies = [x.detach().clone() for x in (lp, olp, A, mask)]
        loss, met = ref.policy_loss(lp, olp, A, mask, "is_reshape_sign")
        (g,) = torch.autograd.grad(loss, lp)
        assert loss.dtype == torch.float32 and g.dtype == dtype
        assert all(v.dtype == torch.float32 for v in met.values())
        for a, b in zip(copies, (lp, olp, A, mask)):
            assert torch.equal(a, b.detach())
        # same as upcasting the inputs to fp32 first
        lp32 = lp.detach().float().requires_grad_()
        l32, _ = ref.policy_loss(lp32, olp.float(), A.float(), mask, "is_reshape_sign")
        (g32,) = torch.autograd.grad(l32, lp32)
        torch.testing.assert_close(loss, l32)
        torch.testing.assert_close(g.float(), g32.to(dtype).float())


def test_sft_special_case():
    # advantages=None ≡ A = 1; γ=0 with gamma_min=0: φ = 1 → token-mean loss = −mean ℓ
    lp, olp, _, mask = make_batch(B=3, T=5, seed=1)
    l1, m1 = ref.policy_loss(lp, olp, None, mask, gamma=0.0, gamma_min=0.0)
    l2, _ = ref.policy_loss(lp, olp, torch.ones_like(olp), mask, gamma=0.0, gamma_min=0.0)
    torch.testing.assert_close(l1, l2)
    ell = torch.where(mask, lp.detach() - olp, 0.0)
    torch.testing.assert_close(l1.detach(), -ell.sum() / mask.sum())
    (g,) = torch.autograd.grad(l1, lp)
    torch.testing.assert_close(g, -mask.to(F64) / mask.sum())


def test_clamp_passes_gradient():
    # d = 30 > C = 20: value uses ℓ = 20, gradient is still −s·φ(ℓ=20) (not 0)
    lp = torch.tensor([[30.0, 0.0]], dtype=F64, requires_grad=True)
    loss, met = ref.policy_loss(lp, torch.zeros_like(lp), loss_type="is_reshape", gamma=0.5,
                                loss_agg_mode="token-sum")
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, torch.tensor([[-math.exp(10.0), -1.0]], dtype=F64))
    assert met["w_max"].item() == pytest.approx(math.exp(20.0))
    assert met["ppo_kl"].item() == pytest.approx(-10.0)


def test_ppo_metrics():
    # w = (1.5, 1.5, 4, 0.5), A = (1, −1, −1, 1): clipped where −A·clip(w) > −A·w → token 0 only
    # (token 2: max(4, 1.2) = 4 → unclipped but dual clipped); clipfrac = 1/4, clipfrac_lower = 1/4
    lp = torch.tensor([[math.log(1.5), math.log(1.5), math.log(4.0), math.log(0.5)]], dtype=F64)
    A = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=F64)
    _, met = ref.policy_loss(lp, torch.zeros_like(lp), A, loss_type="ppo_clip")
    assert met["clipfrac"].item() == pytest.approx(0.25)
    assert met["clipfrac_lower"].item() == pytest.approx(0.25)
    _, met = ref.policy_loss(lp, torch.zeros_like(lp), A, loss_type="ppo_clip", clip_ratio_c=None)
    assert met["clipfrac_lower"].item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_host_sync_runs_on_meta(loss_type):
    # meta tensors have no data: any .item()/.cpu()/data-dependent shape in the reference would raise
    gamma_family = loss_type in ("is_reshape", "is_reshape_sign", "is_reshape_var")
    for agg in AGG_MODES:
        kw = {"gamma": "ess_exact" if agg == "token-mean" else "ess",
              "gamma_granularity": "sequence" if agg == "token-sum" else "batch"} if gamma_family else {}
        lp = torch.randn(3, 5, device="meta", requires_grad=True)
        loss, met = ref.policy_loss(lp, torch.randn(3, 5, device="meta"), torch.randn(3, device="meta"),
                                    torch.ones(3, 5, device="meta"), loss_type, agg, **kw)
        loss.backward()
        assert loss.device.type == "meta" and lp.grad.shape == lp.shape
        assert all(v.device.type == "meta" and v.dim() == 0 for v in met.values())
