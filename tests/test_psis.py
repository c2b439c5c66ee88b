"""PSIS (``isreshape_triton.psis``) against ``arviz.psislw`` and ``gamma="psis"`` in the reference.

arviz 0.23: ``psislw(log_weights, reff=1.0)`` takes *log weights* (here ℓ =
log π_θ − log μ itself) and returns (smoothed normalized log weights, k̂).
"""
import math
import warnings

import numpy as np
import pytest
import torch

import isreshape_triton as irt
from isreshape_triton.metrics import metric_names
from isreshape_triton.dev.profiling import count_work
from isreshape_triton.psis import psis_gamma, psis_smooth, psis_tail_length

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import arviz as az

F64 = torch.float64
ref = irt.reference


def az_psis(lw):
    lw_s, k = az.psislw(np.array(lw, dtype=np.float64, copy=True))
    return np.asarray(lw_s), float(k)


def samples(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        return rng.normal(-0.2, 1.0, n)
    if kind == "t2":
        return 0.5 * rng.standard_t(2, n)
    if kind == "t3":
        return rng.standard_t(3, n)
    raise AssertionError(kind)


def grid_gamma_w(log_w, lo, hi, rho, n_grid=20001):
    """Brute force: the largest grid γ ∈ [lo, hi] with (Σw^γ)²/(n·Σw^{2γ}) ≥ ρ (float64)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    grid = np.linspace(lo, hi, n_grid)
    z = grid[:, None] * (log_w - log_w.max())[None, :]
    om = np.exp(z)
    ratio = om.sum(1) ** 2 / (om ** 2).sum(1) / log_w.size
    ok = np.flatnonzero(ratio >= rho)
    return lo if ok.size == 0 else grid[ok.max()]


# ============================================================================ psis_smooth vs arviz
@pytest.mark.parametrize("kind,n", [("lognormal", 1000), ("lognormal", 5000), ("t2", 2000), ("t3", 2000),
                                    ("lognormal", 25), ("t3", 101)])
def test_psis_smooth_matches_arviz(kind, n):
    lw = samples(kind, n, seed=n)
    expect, k_expect = az_psis(lw)
    got, k = psis_smooth(torch.tensor(lw))
    assert got.dtype == F64 and got.shape == (n,) and k.dim() == 0
    assert math.isfinite(k_expect)
    assert abs(k.item() - k_expect) <= 0.01
    np.testing.assert_allclose(np.exp(got.numpy()), np.exp(expect), rtol=1e-6, atol=0)
    assert abs(torch.logsumexp(got, 0).item()) < 1e-12


def test_psis_smooth_float32_input_and_shift_invariance():
    lw = samples("t3", 2000, seed=3)
    a, k = psis_smooth(torch.tensor(lw))
    b, kb = psis_smooth(torch.tensor(lw) + 7.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert abs(k.item() - kb.item()) < 1e-9
    c, kc = psis_smooth(torch.tensor(lw, dtype=torch.float32))
    expect, ke = az_psis(np.float32(lw).astype(np.float64))
    assert c.dtype == F64 and abs(kc.item() - ke) <= 0.01
    np.testing.assert_allclose(np.exp(c.numpy()), np.exp(expect), rtol=1e-6)


def test_psis_smooth_ties_at_cutoff():
    # rounded values: ties at the cutoff shorten the tail exactly as in arviz
    lw = np.round(samples("lognormal", 400, seed=9), 1)
    expect, k_expect = az_psis(lw)
    got, k = psis_smooth(torch.tensor(lw))
    assert abs(k.item() - k_expect) <= 1e-9
    # tied tail values get different smoothed values in argsort order: compare as multisets
    np.testing.assert_allclose(np.sort(np.exp(got.numpy())), np.sort(np.exp(expect)), rtol=1e-6)


@pytest.mark.parametrize("n", [2, 7, 20])
def test_psis_smooth_too_few_tail_samples(n):
    # M = ceil(min(n/5, 3√n)) ≤ 4 for n ≤ 20: arviz gives k̂ = inf and only normalizes
    assert psis_tail_length(n) <= 4
    lw = samples("lognormal", n, seed=n)
    expect, k_expect = az_psis(lw)
    got, k = psis_smooth(torch.tensor(lw))
    assert k_expect == math.inf and k.item() == math.inf
    np.testing.assert_allclose(got.numpy(), expect, rtol=0, atol=1e-12)


def test_psis_smooth_degenerate_inputs():
    got, k = psis_smooth(torch.zeros(0, dtype=F64))
    assert got.shape == (0,) and k.item() == math.inf
    got, k = psis_smooth(torch.tensor([0.3]))  # arviz raises for n = 1
    assert k.item() == math.inf and got.item() == 0.0
    got, k = psis_smooth(torch.full((50,), 1.5, dtype=F64))  # constant: empty tail
    expect, k_expect = az_psis(np.full(50, 1.5))
    assert k.item() == k_expect == math.inf
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-12)
    with pytest.raises(ValueError, match="log_w"):
        psis_smooth(torch.zeros(3, 4))


# ============================================================================ psis_gamma
def _batch(R, T, seed, scale=1.0, kind="normal", p_masked=0.3):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        ell = scale * torch.randn(R, T, generator=g, dtype=F64)
    else:  # heavy right tail of the log-weights
        rng = np.random.default_rng(seed)
        ell = torch.tensor(scale * rng.standard_t(2, (R, T)))
    ell = ell.clamp(-20, 20)
    group = torch.rand(R, T, generator=g) > p_masked
    return ell, group


# interior γ: (1.5, 0.3), (1.0, 0.5), (2.0, 0.3); upper bound passes: (0.5, 0.3); γ_min fails: (1.8, 0.99)
@pytest.mark.parametrize("scale,rho,lo,hi", [(1.5, 0.3, 0.05, 1.0), (1.0, 0.5, 0.0, 1.0), (2.0, 0.3, 0.05, 1.0),
                                             (0.5, 0.3, 0.05, 0.99), (1.8, 0.99, 0.3, 0.99)])
def test_psis_gamma_matches_grid_on_arviz_smoothed(scale, rho, lo, hi):
    ell, group = _batch(4, 500, seed=int(10 * scale), scale=scale)
    lw = ell.numpy()[group.numpy()]
    sm, k_expect = az_psis(lw)
    assert k_expect <= 0.7
    gamma, k = psis_gamma(ell, group, rho_min=rho, lo=lo, hi=hi, fallback=0.3)
    assert gamma.dim() == 0 and k.dim() == 0 and gamma.dtype == F64
    assert abs(k.item() - k_expect) <= 0.01
    assert abs(gamma.item() - grid_gamma_w(sm, lo, hi, rho)) <= 1e-3
    # garbage outside the group changes nothing
    ell2 = torch.where(group, ell, torch.tensor(math.nan, dtype=F64))
    g2, k2 = psis_gamma(ell2, group, rho_min=rho, lo=lo, hi=hi, fallback=0.3)
    assert g2.item() == gamma.item() and k2.item() == k.item()


def test_psis_gamma_heavy_tail_falls_back():
    ell, group = _batch(2, 1000, seed=1, scale=2.0, kind="t2")
    _, k_expect = az_psis(ell.numpy()[group.numpy()])
    assert k_expect > 0.7
    gamma, k = psis_gamma(ell, group, rho_min=0.3, lo=0.05, hi=1.0, fallback=0.25)
    assert abs(k.item() - k_expect) <= 0.01
    assert gamma.item() == 0.25
    lp = ell.clone().requires_grad_()
    _, met = ref.policy_loss(lp, torch.zeros_like(ell), None, group, gamma="psis", gamma_fallback=0.25)
    assert met["gamma"].item() == 0.25 and met["psis_unreliable"].item() == 1.0
    assert abs(met["psis_k"].item() - k_expect) <= 0.01


def test_psis_gamma_per_row_matches_loop():
    ell, group = _batch(6, 300, seed=4, scale=1.8)
    group[1] = False  # empty row
    group[2, 15:] = False  # 15 tokens: too few to fit
    ell[3] = 0.5 + 3.0 * ell[3]  # a row with a heavier spread
    kw = dict(rho_min=0.4, lo=0.05, hi=1.0, fallback=0.3)
    gamma, k = psis_gamma(ell, group, per_row=True, **kw)
    assert gamma.shape == (6,) and k.shape == (6,)
    for r in range(6):
        g_r, k_r = psis_gamma(ell[r:r + 1], group[r:r + 1], **kw)
        assert abs(gamma[r].item() - g_r.item()) <= 1e-9 and abs(k[r].item() - k_r.item()) <= 1e-9
        lw = ell[r].numpy()[group[r].numpy()]
        if lw.size == 0:
            assert g_r.item() == 1.0 and k_r.item() == 0.0
        elif lw.size <= 20:  # no fit (arviz: k̂ = inf): k̂ reported 0, exact ESS on unsmoothed ℓ
            assert k_r.item() == 0.0
            assert abs(g_r.item() - grid_gamma_w(lw, 0.05, 1.0, 0.4)) <= 1e-3
        else:
            sm, k_expect = az_psis(lw)
            assert abs(k_r.item() - k_expect) <= 0.01
            expect = 0.3 if k_expect > 0.7 else grid_gamma_w(sm, 0.05, 1.0, 0.4)
            assert abs(g_r.item() - expect) <= 1e-3


def test_psis_gamma_edge_cases():
    kw = dict(rho_min=0.3, lo=0.05, hi=0.9, fallback=0.3)
    ell = torch.randn(3, 40, dtype=F64)
    g, k = psis_gamma(ell, torch.zeros(3, 40, dtype=torch.bool), **kw)  # empty group
    assert g.item() == 0.9 and k.item() == 0.0
    g, k = psis_gamma(torch.zeros(0, 5, dtype=F64), torch.zeros(0, 5, dtype=torch.bool), **kw)
    assert g.item() == 0.9 and k.item() == 0.0
    g, k = psis_gamma(torch.full((2, 30), 0.7, dtype=F64), torch.ones(2, 30, dtype=torch.bool), **kw)
    assert g.item() == 0.9 and k.item() == 0.0  # constant ℓ: empty tail, ESS ratio 1
    g, k = psis_gamma(ell.float(), ell > 0, per_row=True, **kw)  # float32 input
    assert g.dtype == F64 and torch.isfinite(g).all() and torch.isfinite(k).all()


@pytest.mark.parametrize("per_row", [False, True])
def test_psis_gamma_at_most_one_sync(per_row):
    ell, group = _batch(8, 400, seed=2, scale=1.5)
    with count_work() as w:
        psis_gamma(ell, group, rho_min=0.3, lo=0.05, hi=1.0, fallback=0.3, per_row=per_row)
    assert w.syncs <= 1


# ============================================================================ reference integration
def _inputs(B=4, T=200, seed=0, scale=1.2):
    g = torch.Generator().manual_seed(seed)
    olp = -2.0 - torch.rand(B, T, generator=g, dtype=F64)
    lp = (olp + scale * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_()
    A = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.2
    return lp, olp, A, mask


@pytest.mark.parametrize("gran", ["batch", "sequence"])
@pytest.mark.parametrize("loss_type", ["is_reshape", "is_reshape_sign", "is_reshape_var"])
def test_reference_psis_runs(loss_type, gran):
    lp, olp, A, mask = _inputs(seed=7)
    loss, met = ref.policy_loss(lp, olp, A, mask, loss_type, gamma="psis", gamma_granularity=gran)
    (grad,) = torch.autograd.grad(loss, lp)
    assert tuple(met) == metric_names(loss_type, irt.make_params(loss_type, gamma="psis"))
    assert met["psis_unreliable"].item() in (0.0, 1.0)
    for key, v in met.items():
        assert v.dim() == 0 and torch.isfinite(v), key
    assert torch.isfinite(grad).all()
    # all masked: finite, psis_k = 0
    _, met0 = ref.policy_loss(lp, olp, A, torch.zeros_like(mask), loss_type, gamma="psis",
                              gamma_granularity=gran)
    assert met0["psis_k"].item() == 0.0 and met0["psis_unreliable"].item() == 0.0
    assert all(torch.isfinite(v) for v in met0.values())


def test_reference_psis_values():
    lp, olp, A, mask = _inputs(seed=11, scale=1.6)
    ell = (lp.detach() - olp).numpy()
    m, a = mask.numpy(), A.numpy()
    # is_reshape, batch: γ on [γ_min, γ_max] from the arviz-smoothed counted tokens
    _, met = ref.policy_loss(lp, olp, A, mask, gamma="psis", rho_min=0.4)
    sm, k = az_psis(ell[m])
    assert abs(met["psis_k"].item() - k) <= 0.01 and met["psis_unreliable"].item() == float(k > 0.7)
    assert abs(met["gamma"].item() - (0.3 if k > 0.7 else grid_gamma_w(sm, 0.05, 1.0, 0.4))) <= 1e-3
    # is_reshape_var: γ_base on [0, 1]
    _, met = ref.policy_loss(lp, olp, A, mask, "is_reshape_var", gamma="psis", rho_min=0.4)
    assert abs(met["gamma_base"].item() - (0.3 if k > 0.7 else grid_gamma_w(sm, 0.0, 1.0, 0.4))) <= 1e-3
    # is_reshape_sign: γ+ on A>0 ([0.05, 0.99]), γ− = 1 + δ on A<0 (δ ∈ [0.01, 0.99])
    _, met = ref.policy_loss(lp, olp, A, mask, "is_reshape_sign", gamma="psis", rho_min=0.4)
    sp, kp = az_psis(ell[m & (a > 0)])
    sn, kn = az_psis(ell[m & (a < 0)])
    assert abs(met["gamma_pos"].item() - (0.3 if kp > 0.7 else grid_gamma_w(sp, 0.05, 0.99, 0.4))) <= 1e-3
    assert abs(met["gamma_neg"].item() - 1 - (0.3 if kn > 0.7 else grid_gamma_w(sn, 0.01, 0.99, 0.4))) <= 1e-3
    assert abs(met["psis_k"].item() - max(kp, kn)) <= 0.01
    # sequence: psis_k = the max over rows
    _, met = ref.policy_loss(lp, olp, A, mask, gamma="psis", gamma_granularity="sequence")
    ks = [az_psis(ell[b][m[b]])[1] for b in range(ell.shape[0])]
    assert abs(met["psis_k"].item() - max(ks)) <= 0.01
    assert met["psis_unreliable"].item() == float(max(ks) > 0.7)


def test_reference_psis_sign_fallback_and_empty_groups():
    g = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    ell = torch.tensor(2.0 * rng.standard_t(2, (2, 600))).clamp(-20, 20)
    A = torch.ones(2, 600, dtype=F64)  # no A<0 tokens: γ− = 1.5
    lp = ell.clone().requires_grad_()
    _, met = ref.policy_loss(lp, torch.zeros_like(ell), A, None, "is_reshape_sign", gamma="psis",
                             gamma_fallback=0.2, neg_saturation="none")
    assert met["psis_k"].item() > 0.7 and met["psis_unreliable"].item() == 1.0
    assert met["gamma_pos"].item() == pytest.approx(0.2) and met["gamma_neg"].item() == 1.5
    # δ falls back to gamma_fallback on the A<0 group
    _, met = ref.policy_loss(lp, torch.zeros_like(ell), -A, None, "is_reshape_sign", gamma="psis",
                             gamma_fallback=0.2, neg_saturation="none")
    assert met["gamma_neg"].item() == pytest.approx(1.2) and met["gamma_pos"].item() == 0.5
    # fixed exponents: nothing is fitted
    _, met = ref.policy_loss(lp, torch.zeros_like(ell), A, None, "is_reshape_sign", gamma="psis",
                             gamma_pos=0.6, gamma_neg=1.4)
    assert met["psis_k"].item() == 0.0 and met["psis_unreliable"].item() == 0.0
    del g


def test_reference_psis_on_meta_no_sync():
    for loss_type in ("is_reshape", "is_reshape_sign", "is_reshape_var"):
        for gran in ("batch", "sequence"):
            lp = torch.randn(3, 40, device="meta", requires_grad=True)
            loss, met = ref.policy_loss(lp, torch.randn(3, 40, device="meta"), torch.randn(3, device="meta"),
                                        torch.ones(3, 40, device="meta"), loss_type, gamma="psis",
                                        gamma_granularity=gran)
            assert "psis_k" in met and all(v.device.type == "meta" for v in met.values())
