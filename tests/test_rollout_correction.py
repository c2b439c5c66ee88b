"""The rollout correction computed inside the op from ``rollout_log_prob`` (issue 18): the IS
weight (TIS, IcePop's mask, none) of the token or sequence ratio and verl's rejection (k1, k2,
k3 per token, or a row's sum, mean, max), of π_old or of π (verl's bypass mode) against
π_rollout, on every family, kernels against the reference: loss, gradient, every metric; the
rejection leaves the count mask in both passes (normalizers, statistics, PSIS context); the
combinations the op does not compute raise; NaN where a counted token's rollout log-prob is,
nothing where a masked one's is; bad options name themselves."""
import math

import pytest
import torch

import isreshape_triton as irt
from isreshape_triton import launch
from isreshape_triton.params import RolloutCorrection

from _cases import FAMILY_CONFIGS, make_batch, pairwise, refused_correction, sampled
from test_chunks import _packed_batch
from test_kernels import SMALL_TILING, check_against_reference, fused_with_counts, reference

CORRECTIONS = [
    {},  # TIS at 2 (verl's default threshold)
    {"weight": "truncate", "weight_min": 0.8, "weight_max": 1.25},  # TRL's token_truncate with a floor
    {"weight": "mask", "weight_min": 0.5, "weight_max": 1.5},  # IcePop
    {"weight": None, "reject": "k1", "reject_min": 0.6, "reject_max": 1.7},
    {"reject": "k2", "reject_max": 0.08},
    {"weight": "mask", "weight_max": 1.4, "reject": "k3", "reject_max": 0.05, "ratio_of": "current"},
    # the sequence ratio (verl's rollout_is="sequence", TRL's sequence_*) and the row rejections
    {"level": "sequence", "weight_max": 3.0},
    {"level": "sequence", "weight": "mask", "weight_min": 0.1, "weight_max": 10.0},
    {"weight": None, "reject": "k1", "reject_min": 0.1, "reject_max": 10.0, "reject_level": "sequence_sum"},
    {"level": "sequence", "reject": "k2", "reject_max": 0.08, "reject_level": "sequence_mean"},
    {"weight": "truncate", "reject": "k3", "reject_max": 0.6, "reject_level": "sequence_max", "ratio_of": "current"},
]
FAMILIES = sampled(5) + [c for c in FAMILY_CONFIGS if c[1].get("gamma") == "psis"][:1]
CASES = pairwise({"family": FAMILIES, "correction": CORRECTIONS,
                  "agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
                  "dtype": (torch.float32, torch.float64, torch.bfloat16),
                  "special": ("plain", "extreme", "nan_masked", "empty_rows")})


def _rollout_log_prob(olp, mask, seed, nan_masked=False):
    g = torch.Generator().manual_seed(seed)
    rlp = olp.double() + 0.4 * torch.randn(olp.shape, generator=g, dtype=torch.float64)
    if nan_masked and mask is not None:
        rlp = torch.where(mask != 0, rlp, math.nan)
    return rlp.to(olp.dtype)


def _case_id(c):
    return (f"{c['family'][0]}{c['family'][1]}-{c['correction']}-{c['agg']}-{str(c['dtype'])[6:]}-"
            f"{c['special']}").replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_correction_matches_the_reference(case, poisoned_outputs):
    """Loss, gradient and every metric (the rollout_* ones included), 1-2 launches, 0 syncs."""
    loss_type, opts = case["family"]
    i = CASES.index(case)
    lp, olp, adv, mask = make_batch(4, 41, case["dtype"], special=case["special"], seed=i)
    rlp = _rollout_log_prob(olp, mask, i, case["special"] == "nan_masked")
    rtol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-4}[case["dtype"]]
    if opts.get("gamma") == "ess_exact" and opts.get("gamma_granularity") == "sequence":
        rtol = 2e-3  # the rows' γ refined in a bracket, the reference's to 1e-3 (as in test_chunks)
    options = {**opts, "rollout_log_prob": rlp, "rollout_correction": case["correction"]}
    if refused_correction(loss_type, opts, case["correction"]):
        for path in (fused_with_counts, reference):
            with pytest.raises(NotImplementedError, match="is not computed"):
                path(lp, olp, adv, mask, loss_type, case["agg"], **options)
        return
    _, metrics, _ = check_against_reference(lp, olp, adv, mask, loss_type, case["agg"], options, rtol=rtol)
    if case["correction"].get("reject") and case["correction"].get("reject_level", "token") == "token":
        assert 0 < metrics["rollout_rs_masked_fraction"] < 1  # the rejection is active


@pytest.mark.parametrize("lengths", [(37, 0, 5, 60, 1, 20), (300,)])
def test_packed_rows_with_small_chunks(lengths, poisoned_outputs, monkeypatch):
    """Packed rows that span chunks and programs: the rejected tokens leave every row's count."""
    monkeypatch.setattr(launch, "TILING", SMALL_TILING)
    lp, olp, adv, mask, seq_adv, cu = _packed_batch(lengths, seed=len(lengths))
    rlp = _rollout_log_prob(olp, mask, 5)
    for loss_type, opts in (("gspo", {}), ("is_reshape", {"gamma_granularity": "sequence"}), ("vespo", {})):
        for correction in CORRECTIONS[3:5] + CORRECTIONS[7:]:
            if refused_correction(loss_type, opts, correction):
                continue
            check_against_reference(lp, olp, seq_adv, mask, loss_type, "seq-mean-token-mean",
                                    {**opts, "cu_seqlens": cu, "rollout_log_prob": rlp,
                                     "rollout_correction": correction})


def test_weights_and_rejection_by_hand():
    """One row, three tokens with x = ln 3, 0, −ln 4: TIS at 2 → r = (2, 1, 1/4); IcePop
    [0.5, 2] → (0, 1, 0); k1 [0.5, 2] rejects tokens 1 and 3 out of the token-mean's count."""
    olp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    rlp = olp - torch.tensor([[math.log(3.0), 0.0, -math.log(4.0)]], dtype=torch.float64)
    lp = olp.clone()  # w = 1: gpg's F = A·lp
    adv = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    expected = {"truncate": (2.0, 1.0, 0.25), "mask": (0.0, 1.0, 0.0)}
    for weight, r in expected.items():
        corr = {"weight": weight, "weight_min": 0.5 if weight == "mask" else None, "weight_max": 2.0}
        for fn in (lambda *a, **k: fused_with_counts(*a, **k)[:3], reference):
            loss, metrics, grad = fn(lp, olp, adv, None, "gpg", "token-sum", rollout_log_prob=rlp,
                                     rollout_correction=corr)
            torch.testing.assert_close(grad, -torch.tensor([r], dtype=torch.float64))
            torch.testing.assert_close(metrics["rollout_is_mean"], torch.tensor(sum(r) / 3, dtype=torch.float64))
            assert float(metrics["rollout_is_fraction_high"]) == pytest.approx(1 / 3)
            assert float(metrics["rollout_is_fraction_low"]) == pytest.approx(1 / 3)
    corr = {"weight": None, "reject": "k1", "reject_min": 0.5, "reject_max": 2.0}
    for fn in (lambda *a, **k: fused_with_counts(*a, **k)[:3], reference):
        loss, metrics, grad = fn(lp, olp, adv, None, "gpg", "token-mean", rollout_log_prob=rlp,
                                 rollout_correction=corr)
        torch.testing.assert_close(grad, torch.tensor([[0.0, -1.0, 0.0]], dtype=torch.float64))
        assert float(metrics["token_count"]) == 1
        assert float(metrics["rollout_rs_masked_fraction"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("correction", [CORRECTIONS[0], CORRECTIONS[3], CORRECTIONS[6], CORRECTIONS[8]])
def test_nonfinite_rollout_log_prob(correction):
    """A NaN rollout log-prob at a counted token: that token is non-finite (kept by a token or row
    rejection; a sequence weight is NaN on its whole row, which counts only the token), the loss
    and rollout_is_mean NaN on both paths; at a masked token: nothing."""
    lp, olp, adv, mask = make_batch(2, 9, torch.float64, seed=3)
    rlp = _rollout_log_prob(olp, mask, 1)
    counted, masked = (mask.nonzero()[0].tolist(), (~mask).nonzero()[0].tolist())
    rlp_masked = rlp.clone()
    rlp_masked[tuple(masked)] = math.nan
    opts = {"rollout_correction": correction}
    clean = fused_with_counts(lp, olp, adv, mask, "ppo_clip", "token-mean", rollout_log_prob=rlp, **opts)
    poisoned_masked = fused_with_counts(lp, olp, adv, mask, "ppo_clip", "token-mean",
                                        rollout_log_prob=rlp_masked, **opts)
    assert torch.equal(clean[0], poisoned_masked[0]) and torch.equal(clean[2], poisoned_masked[2])
    rlp_counted = rlp.clone()
    rlp_counted[tuple(counted)] = math.nan
    loss, metrics, grad, _ = fused_with_counts(lp, olp, adv, mask, "ppo_clip", "token-mean",
                                               rollout_log_prob=rlp_counted, **opts)
    r_loss, r_metrics, r_grad = reference(lp, olp, adv, mask, "ppo_clip", "token-mean",
                                          rollout_log_prob=rlp_counted, **opts)
    assert loss.isnan() and r_loss.isnan() and metrics["rollout_is_mean"].isnan()
    assert float(metrics["nonfinite_tokens"]) == float(r_metrics["nonfinite_tokens"]) == 1
    for name in metrics:
        torch.testing.assert_close(metrics[name], r_metrics[name], equal_nan=True, msg=name)
    torch.testing.assert_close(grad, r_grad, equal_nan=True)


def test_sequence_weight_and_rejection_by_hand():
    """Two rows of x = (ln 2, ln 2) and (ln 3, −ln 3): the sequence ratios 4 and 1; TIS at 2 →
    r = (2, 2 | 1, 1); IcePop [0.5, 2] → (0, 0 | 1, 1) and one row of two above the bound; a row
    k1 rejection on Σx with [0.5, 2] drops row 1 out of the token-mean's count."""
    olp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], dtype=torch.float64)
    x = torch.tensor([[math.log(2.0), math.log(2.0)], [math.log(3.0), -math.log(3.0)]], dtype=torch.float64)
    rlp, lp, adv = olp - x, olp.clone(), torch.ones(2, 2, dtype=torch.float64)
    for weight, r in {"truncate": (2.0, 1.0), "mask": (0.0, 1.0)}.items():
        corr = {"level": "sequence", "weight": weight, "weight_min": 0.5, "weight_max": 2.0}
        for fn in (lambda *a, **k: fused_with_counts(*a, **k)[:3], reference):
            loss, metrics, grad = fn(lp, olp, adv, None, "gpg", "token-sum", rollout_log_prob=rlp,
                                     rollout_correction=corr)
            torch.testing.assert_close(grad, -torch.tensor([[r[0]] * 2, [r[1]] * 2], dtype=torch.float64))
            assert float(metrics["rollout_is_fraction_high"]) == pytest.approx(0.5)  # one row of two
            assert float(metrics["rollout_is_fraction_low"]) == 0.0
    corr = {"weight": None, "reject": "k1", "reject_min": 0.5, "reject_max": 2.0, "reject_level": "sequence_sum"}
    for fn in (lambda *a, **k: fused_with_counts(*a, **k)[:3], reference):
        loss, metrics, grad = fn(lp, olp, adv, None, "gpg", "token-mean", rollout_log_prob=rlp,
                                 rollout_correction=corr)
        torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [-0.5, -0.5]], dtype=torch.float64))
        assert float(metrics["token_count"]) == 2 and float(metrics["rollout_rs_masked_fraction"]) == 0.5


def test_from_logits_takes_the_correction():
    """policy_loss_from_logits passes the correction to the log-prob op (ratio of π: bypass)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    olp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] + 0.2 * torch.randn(2, 7, generator=g)
    rlp = olp + 0.3 * torch.randn(2, 7, generator=g)
    adv = torch.randn(2, 7, generator=g)
    corr = CORRECTIONS[5]
    out = []
    for use_reference in (False, True):
        x = logits.clone().requires_grad_()
        fn = irt.reference.policy_loss_from_logits if use_reference else irt.policy_loss_from_logits
        loss, metrics = fn(x, labels, olp, adv, None, "ppo_clip", rollout_log_prob=rlp, rollout_correction=corr)
        loss.backward()
        out.append((loss, metrics, x.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-5, atol=1e-6)
    assert set(out[0][1]) == set(out[1][1]) and "rollout_rs_masked_fraction" in out[0][1]


@pytest.mark.parametrize("options,error,match", [
    ({"rollout_is_weights": 1}, ValueError, "rollout_is_weights and rollout_log_prob are both given"),
    ({"rollout_correction": {"weight": "clip"}}, ValueError, "weight must be one of"),
    ({"rollout_correction": {"weight_min": 3.0}}, ValueError, r"weight_min \(3.0\) must not exceed weight_max"),
    ({"rollout_correction": {"weight_max": -1.0}}, ValueError, "weight_max must be"),
    ({"rollout_correction": {"reject": "k2"}}, ValueError, "reject='k2' needs reject_max"),
    ({"rollout_correction": {"reject": "k3", "reject_min": 0.1, "reject_max": 1.0}}, ValueError,
     "reject_min must be None"),
    ({"rollout_correction": {"reject": "k1"}}, ValueError, "reject='k1' needs reject_min or reject_max"),
    ({"rollout_correction": {"reject_max": 2.0}}, ValueError, "without reject"),
    ({"rollout_correction": {"ratio_of": "rollout"}}, ValueError, "ratio_of must be one of"),
    ({"rollout_correction": {"treshold": 2.0}}, TypeError, "unknown option 'treshold'"),
    ({"rollout_correction": {"level": "row"}}, ValueError, "level must be one of"),
    ({"rollout_correction": {"reject_level": "sequence_max", "reject": "k1", "reject_max": 2.0}}, ValueError,
     "sequence_max' bounds a divergence"),
    ({"rollout_correction": {"reject_level": "sequence_sum"}}, ValueError, "is given without reject"),
    ({"rollout_correction": 2.0}, TypeError, "rollout_correction must be a RolloutCorrection"),
    ({"rollout_log_prob": "shape"}, ValueError, "rollout_log_prob shape"),
    ({"rollout_log_prob": None, "rollout_correction": {}}, ValueError, "rollout_correction is given without"),
])
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_bad_options_name_themselves(options, error, match, path):
    lp, olp, adv, mask = make_batch(2, 5, torch.float32)
    kw = {"rollout_log_prob": olp - 0.1, **options}
    if kw["rollout_log_prob"] == "shape":
        kw["rollout_log_prob"] = olp[:, :3]
    if kw.get("rollout_is_weights") == 1:
        kw["rollout_is_weights"] = torch.ones_like(olp)
    fn = fused_with_counts if path == "kernels" else reference
    with pytest.raises(error, match=match):
        fn(lp, olp, adv, mask, "ppo_clip", "token-mean", **kw)


def test_correction_dataclass_is_the_option():
    """A RolloutCorrection instance, a dict of its fields and the default (TIS at 2) all work."""
    lp, olp, adv, mask = make_batch(2, 6, torch.float64)
    rlp = _rollout_log_prob(olp, mask, 0)
    as_class = fused_with_counts(lp, olp, adv, mask, "sapo", "token-mean", rollout_log_prob=rlp,
                                 rollout_correction=RolloutCorrection("truncate", weight_max=2.0))
    as_default = fused_with_counts(lp, olp, adv, mask, "sapo", "token-mean", rollout_log_prob=rlp)
    assert torch.equal(as_class[0], as_default[0]) and torch.equal(as_class[2], as_default[2])


@pytest.mark.parametrize("correction,loss_type,extra", [
    ({}, "ppo_clip", 4),  # the loss pass reads the rollout log-probs
    ({"reject": "k2", "reject_max": 0.1}, "is_reshape", 8),  # and the statistics pass, for the rejection
    ({"reject": "k2", "reject_max": 0.1}, "ppo_clip", 4),  # no statistics pass: the loss pass alone
    ({"level": "sequence"}, "ppo_clip", 4 + 4 + 8 + 4),  # pass 1 for the rows: lp, olp, mask, rollout
    ({"level": "sequence"}, "gspo", 8),  # gspo's own pass 1 reads it too
])
def test_traffic_model_counts_the_rollout_stream(correction, loss_type, extra):
    """fp32, float mask: the rollout log-probs add 4 bytes per token per pass that reads them; a
    row quantity runs pass 1 for a family without statistics; its records are O(rows + chunks)."""
    from isreshape_triton.launch import traffic_model

    B, T = 64, 4096
    base = traffic_model(loss_type, torch.float32, torch.float32, B, T, split=True)
    streams, buffers = traffic_model(loss_type, torch.float32, torch.float32, B, T, split=True,
                                     correction=RolloutCorrection(**correction))
    assert streams - base[0] == extra * B * T
    rows = RolloutCorrection(**correction).per_row  # records: 3 floats written and read per piece
    assert (0 < buffers - base[1] <= 2 * 3 * 4 * (B + B * T // 512)) if rows else buffers == base[1]
