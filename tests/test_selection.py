"""A family's token selection (``isreshape_triton/selection.py``, ``kernels/select.py``): kl_cov and
clip_cov select exactly k = max(1, ⌊n·ratio⌋) tokens (verl's ``int(n * ratio)`` in fp64), ties to
the first by position, deterministically, on the kernel path as in the reference."""
from __future__ import annotations

import pytest
import torch

import isreshape_triton as irt
from isreshape_triton.dev.profiling import LaunchCounter
from isreshape_triton.launch import fp32_parts

from _cases import make_batch


def both(lp, olp, adv, mask, loss_type, **opts):
    """(loss, metrics, grad) of the kernel path and of the reference."""
    out = []
    for fn in (irt.policy_loss, irt.reference.policy_loss):
        x = lp.detach().clone().requires_grad_()
        with LaunchCounter() as launches:
            loss, metrics = fn(x, olp, adv, mask, loss_type, **opts)
        loss.backward()
        out.append((loss.detach(), metrics, x.grad))
        if fn is irt.policy_loss:
            assert launches.launches == 4  # statistics, keys, k-th, loss (and the sort)
    return out


def selected_count(metrics, mask) -> float:
    return round(float(metrics["cov_selected"]) * int(mask.sum()))


@pytest.mark.parametrize("ratio,k", [(0.7, 7), (0.3, 3), (0.05, 1)])
def test_count_is_verls_int_of_n_times_ratio(ratio, k):
    """n = 10 counted tokens: ⌊10·0.7⌋ = 7 in fp64 (fp32's 0.7 would give 6), at least 1."""
    lp, olp, adv, mask = make_batch(2, 7, seed=1)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask.view(-1)[torch.randperm(14, generator=torch.Generator().manual_seed(0))[:10]] = True
    assert [int(10 * r) for r in (0.7, 0.3, 0.05)] == [7, 3, 0]
    for (_, metrics, _) in both(lp, olp, adv, mask, "kl_cov", kl_cov_ratio=ratio):
        assert selected_count(metrics, mask) == k
    parts = fp32_parts(ratio)
    assert sum(torch.tensor(parts, dtype=torch.float64).tolist()) == ratio


def test_ties_go_to_the_first_tokens_by_position():
    """Without advantages every cov is 0: kl_cov penalises the first k counted tokens, and so
    does the reference; clip_cov with duplicated rows (equal keys) drops exactly k."""
    lp, olp, _, mask = make_batch(3, 20, seed=2)
    beta, ratio = 0.5, 0.2
    kernel, ref = both(lp, olp, None, mask, "kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=beta)
    (loss, metrics, grad), (r_loss, r_metrics, r_grad) = kernel, ref
    n = int(mask.sum())
    k = int(n * ratio)
    first = torch.zeros(mask.numel(), dtype=torch.bool)
    first[mask.reshape(-1).nonzero()[:k, 0]] = True
    ell = (lp - olp).clamp(-20, 20)
    want = (-torch.exp(ell) + beta * ell.abs() * first.reshape(mask.shape))[mask].sum() / n
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_loss, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, r_grad, rtol=1e-5, atol=1e-7)
    assert selected_count(metrics, mask) == selected_count(r_metrics, mask) == k

    lp, olp, adv, mask = make_batch(4, 30, seed=3)
    lp[1], olp[1], adv[1], mask[1] = lp[0], olp[0], adv[0], mask[0]
    opts = dict(clip_cov_ratio=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0, seed=5)
    (loss, metrics, grad), (r_loss, r_metrics, r_grad) = both(lp, olp, adv, mask, "clip_cov", **opts)
    assert selected_count(metrics, mask) == selected_count(r_metrics, mask) == int(int(mask.sum()) * 0.1)
    torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, r_grad, rtol=1e-5, atol=1e-7)


def test_clip_cov_draw_is_seeded():
    """The same seed drops the same tokens, bit for bit; another seed other tokens."""
    lp, olp, adv, mask = make_batch(4, 40, seed=4)
    opts = dict(clip_cov_ratio=0.05, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    grads = []
    for seed in (1, 1, 2):
        x = lp.clone().requires_grad_()
        loss, _ = irt.policy_loss(x, olp, adv, mask, "clip_cov", seed=seed, **opts)
        loss.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("loss_type", ["kl_cov", "clip_cov"])
def test_a_rollout_rejection_is_refused_by_name(loss_type):
    lp, olp, adv, mask = make_batch(2, 8, seed=5)
    with pytest.raises(NotImplementedError, match="token selection"):
        irt.policy_loss(lp, olp, adv, mask, loss_type, rollout_log_prob=olp,
                        rollout_correction={"reject": "k3", "reject_max": 0.1})
    irt.policy_loss(lp, olp, adv, mask, loss_type, rollout_log_prob=olp,  # weights alone apply
                    rollout_correction={"weight": "truncate", "weight_max": 2.0})


@pytest.mark.parametrize("bad", ["seed", "ratio", "window"])
def test_bad_selection_options_are_named(bad):
    with pytest.raises(ValueError, match={"seed": "seed", "ratio": "kl_cov_ratio", "window": "clip_cov_lb"}[bad]):
        if bad == "seed":
            irt.make_params("clip_cov", seed=1 << 24)
        elif bad == "ratio":
            irt.make_params("kl_cov", kl_cov_ratio=0.0)
        else:
            irt.make_params("clip_cov", clip_cov_lb=2.0, clip_cov_ub=1.0)
