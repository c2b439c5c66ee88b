"""Bad input (SPEC §11): a clear ValueError/TypeError naming the argument.

Runs against the reference ``irt.reference.policy_loss`` (validation is shared
with the kernel path through ``params.py`` / ``inputs.py``).
"""
import pytest
import torch

import isreshape_triton as irt

ref = irt.reference


def inputs(B=2, T=4, dtype=torch.float32):
    lp = torch.randn(B, T, dtype=dtype, requires_grad=True)
    olp = torch.randn(B, T, dtype=dtype)
    A = torch.randn(B, T, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    return lp, olp, A, mask


def call(lp=None, olp=None, A="default", mask="default", loss_type="is_reshape", agg="token-mean", **kw):
    d_lp, d_olp, d_A, d_mask = inputs()
    lp = d_lp if lp is None else lp
    olp = d_olp if olp is None else olp
    A = d_A if isinstance(A, str) else A
    mask = d_mask if isinstance(mask, str) else mask
    return ref.policy_loss(lp, olp, A, mask, loss_type, agg, **kw)


# ---------------------------------------------------------------------------- shapes
def test_shape_mismatch_old_log_prob():
    with pytest.raises(ValueError, match="old_log_prob"):
        call(olp=torch.randn(2, 5))


def test_shape_mismatch_advantages():
    with pytest.raises(ValueError, match="advantages"):
        call(A=torch.randn(2, 5))
    with pytest.raises(ValueError, match="advantages"):
        call(A=torch.randn(3))


def test_shape_mismatch_response_mask():
    with pytest.raises(ValueError, match="response_mask"):
        call(mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="response_mask"):
        call(mask=torch.ones(2, dtype=torch.bool))


def test_scalar_log_prob():
    with pytest.raises(ValueError, match="log_prob"):
        ref.policy_loss(torch.tensor(0.5), torch.tensor(0.1))


# ---------------------------------------------------------------------------- names
def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="grpo")


def test_unknown_loss_agg_mode():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        call(agg="mean")


def test_unknown_option():
    with pytest.raises(TypeError, match="clip_ratio"):
        call(loss_type="is_reshape", clip_ratio=0.2)  # a ppo_clip-style option on is_reshape
    with pytest.raises(TypeError, match="tau_h"):
        call(loss_type="sapo", tau_h=1.0)


def test_bad_saturation_name():
    with pytest.raises(ValueError, match="neg_saturation"):
        call(loss_type="is_reshape_sign", neg_saturation="hard")


def test_bad_pos_weight_name():
    with pytest.raises(ValueError, match="pos_weight"):
        call(loss_type="is_reshape_sign", pos_weight="linear")


@pytest.mark.parametrize("loss_type", ["is_reshape", "is_reshape_var"])
def test_bad_gamma_rule(loss_type):
    with pytest.raises(ValueError, match="gamma"):
        call(loss_type=loss_type, gamma="psis2")
    with pytest.raises(ValueError, match="gamma_granularity"):
        call(loss_type=loss_type, gamma_granularity="token")


def test_sign_gamma_rule_must_be_a_name():
    with pytest.raises(ValueError, match="gamma"):
        call(loss_type="is_reshape_sign", gamma=0.5)


def test_wrong_params_class():
    with pytest.raises(TypeError, match="params"):
        call(loss_type="sapo", params=irt.PPOClipParams())


# ---------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("loss_type", ["is_reshape", "is_reshape_sign", "is_reshape_var"])
@pytest.mark.parametrize("rho", [0.0, 1.0, -0.2, 1.5])
def test_rho_min_out_of_range(loss_type, rho):
    with pytest.raises(ValueError, match="rho_min"):
        call(loss_type=loss_type, rho_min=rho)


@pytest.mark.parametrize("loss_type,name", [
    ("is_reshape_tr", "tau_h"), ("is_reshape_tr", "tau_c"), ("sapo", "tau_pos"), ("sapo", "tau_neg"),
    ("is_reshape_sign", "mm_tau"), ("is_reshape_sign", "saturation_lambda"),
    ("is_reshape_var", "temperature"),
])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_tau_not_positive(loss_type, name, value):
    with pytest.raises(ValueError, match=name):
        call(loss_type=loss_type, **{name: value})


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_clip_ratio_c_not_above_one(c):
    with pytest.raises(ValueError, match="clip_ratio_c"):
        call(loss_type="ppo_clip", clip_ratio_c=c)


def test_clip_ratio_low_range():
    with pytest.raises(ValueError, match="clip_ratio_low"):
        call(loss_type="ppo_clip", clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="clip_ratio_high"):
        call(loss_type="ppo_clip", clip_ratio_high=-0.1)


@pytest.mark.parametrize("loss_type", ["is_reshape", "is_reshape_var"])
def test_gamma_min_above_gamma_max(loss_type):
    with pytest.raises(ValueError, match="gamma_min"):
        call(loss_type=loss_type, gamma_min=0.8, gamma_max=0.5)


def test_gamma_base_above_gamma_max_tr():
    with pytest.raises(ValueError, match="gamma_base"):
        call(loss_type="is_reshape_tr", gamma_base=0.95, gamma_max=0.9)


def test_truncate_max_below_one():
    with pytest.raises(ValueError, match="truncate_max"):
        call(loss_type="is_reshape_sign", truncate_max=0.5)


def test_log_ratio_clamp_not_positive():
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        call(log_ratio_clamp=0.0)


@pytest.mark.parametrize("name,value", [("dp_size", 0), ("dp_size", 1.5), ("global_token_count", -1.0),
                                        ("global_batch_size", float("nan")),
                                        ("loss_scale_factor", -2.0)])
def test_bad_agg_options(name, value):
    with pytest.raises(ValueError, match=name):
        call(**{name: value})


# ---------------------------------------------------------------------------- dtypes, devices
def test_integer_log_prob():
    with pytest.raises(TypeError, match="log_prob"):
        call(lp=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="old_log_prob"):
        call(olp=torch.zeros(2, 4, dtype=torch.int32))


def test_integer_advantages():
    with pytest.raises(TypeError, match="advantages"):
        call(A=torch.zeros(2, 4, dtype=torch.int64))


def test_non_tensor_log_prob():
    with pytest.raises(TypeError, match="log_prob"):
        ref.policy_loss([[0.1, 0.2]], torch.zeros(1, 2))


@pytest.mark.parametrize("which", ["old_log_prob", "advantages", "response_mask"])
def test_different_devices(which):
    lp, olp, A, mask = inputs()
    kw = {"old_log_prob": olp, "advantages": A, "response_mask": mask}
    kw[which] = kw[which].to("meta")
    with pytest.raises(ValueError, match=which):
        ref.policy_loss(lp, kw["old_log_prob"], kw["advantages"], kw["response_mask"])


def test_log_prob_on_other_device():
    lp, olp, A, mask = inputs()
    with pytest.raises(ValueError, match="log_prob"):
        ref.policy_loss(lp.detach().to("meta"), olp, A, mask)


def test_process_group_not_on_reference():
    group = torch.distributed.ProcessGroup(torch.distributed.HashStore(), 0, 1)
    with pytest.raises(NotImplementedError, match="process_group"):
        call(process_group=group)
    with pytest.raises(TypeError, match="process_group"):  # not a ProcessGroup (SPEC §11)
        call(process_group=object())


def test_valid_mask_dtypes_accepted():
    lp, olp, A, _ = inputs()
    for mask in (torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.float16),
                 torch.ones(2, 4, dtype=torch.uint8)):
        loss, _ = ref.policy_loss(lp, olp, A, mask)
        assert torch.isfinite(loss)


# ---------------------------------------------------------------------------- issue 16: clear messages
ENTRY_POINTS = ["policy_loss", "PolicyLoss", "policy_loss_from_logits", "reference.policy_loss",
                "reference.policy_loss_from_logits"]


def _entry(name, loss_type="is_reshape", agg="token-mean", **kw):
    """Call entry point ``name`` on a small batch (the kernel path for the irt.* ones: the tests
    run under TRITON_INTERPRET=1)."""
    lp, olp, A, mask = inputs()
    if name == "PolicyLoss":
        return irt.PolicyLoss(loss_type, agg, **kw)(lp, olp, A, mask)
    if name.endswith("from_logits"):
        logits, labels = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
        fn = ref.policy_loss_from_logits if name.startswith("reference") else irt.policy_loss_from_logits
        return fn(logits, labels, olp, A, mask, loss_type, agg, **kw)
    fn = ref.policy_loss if name.startswith("reference") else irt.policy_loss
    return fn(lp, olp, A, mask, loss_type, agg, **kw)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("which,value,closest", [
    ("loss_type", "is_reshap", "is_reshape"), ("loss_type", "ppo-clip", "ppo_clip"),
    ("loss_agg_mode", "token_mean", "token-mean"), ("loss_agg_mode", "seq-mean-token-sum_norm", "seq-mean-token-sum-norm"),
])
def test_misspelt_name_suggests_the_closest(entry, which, value, closest):
    """One line: the argument, the valid names, what was given, and the closest valid name."""
    kw = {"loss_type": value} if which == "loss_type" else {"agg": value}
    with pytest.raises(ValueError) as info:
        _entry(entry, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{which} must be one of")
    assert f"got {value!r} (did you mean {closest!r}?)" in msg


def test_unrelated_name_has_no_suggestion():
    with pytest.raises(ValueError, match="loss_type") as info:
        call(loss_type="grpo_like_nothing")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("loss_type,bounds,gamma", [
    ("is_reshape", {}, 0.0),  # default gamma_min = 0.05: weighted SFT needs gamma_min=0
    ("is_reshape", {}, 1.5),
    ("is_reshape", {"gamma_min": 0.2, "gamma_max": 0.6}, 0.1),
    ("is_reshape", {"gamma_min": 0.2, "gamma_max": 0.6}, 0.7),
    ("is_reshape", {"gamma_max": 2.0}, 2.5),
    ("is_reshape_var", {}, 1.2),
    ("is_reshape_var", {"gamma_min": 0.1}, 0.05),
])
def test_fixed_gamma_outside_its_bounds_raises(path, loss_type, bounds, gamma):
    """A fixed gamma outside [gamma_min, gamma_max] is an error naming gamma and the bounds
    (it used to be clipped silently), on both paths and for the params dataclasses."""
    fn = irt.policy_loss if path == "kernel" else ref.policy_loss
    lp, olp, A, mask = inputs()
    lo, hi = bounds.get("gamma_min", 0.05 if loss_type == "is_reshape" else 0.0), bounds.get("gamma_max", 1.0)
    with pytest.raises(ValueError) as info:
        fn(lp, olp, A, mask, loss_type, gamma=gamma, **bounds)
    msg = str(info.value)
    assert f"gamma={gamma!r}" in msg and "gamma_min" in msg and "gamma_max" in msg and f"[{lo!r}, {hi!r}]" in msg
    with pytest.raises(ValueError, match=r"gamma=.*gamma_min, gamma_max"):
        irt.make_params(loss_type, gamma=gamma, **bounds)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_fixed_gamma_at_its_bounds_is_used_as_given(path):
    fn = irt.policy_loss if path == "kernel" else ref.policy_loss
    lp, olp, A, mask = inputs()
    for gamma, bounds in ((0.05, {}), (1.0, {}), (0.0, {"gamma_min": 0.0}), (2.0, {"gamma_max": 2.0}),
                          (0.3, {"gamma_min": 0.3, "gamma_max": 0.3})):
        metrics = fn(lp, olp, A, mask, "is_reshape", gamma=gamma, **bounds)[1]
        torch.testing.assert_close(metrics["gamma"].double(), torch.tensor(gamma, dtype=torch.float64),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_kl_coef_and_ref_log_prob_need_each_other(path):
    """kl_coef without ref_log_prob, or ref_log_prob without kl_coef: the same ValueError on
    both paths, naming both arguments (neither is ignored silently)."""
    fn = irt.policy_loss if path == "kernel" else ref.policy_loss
    lp, olp, A, mask = inputs()
    ref_lp = olp - 0.1
    with pytest.raises(ValueError) as info:
        fn(lp, olp, A, mask, kl_coef=0.1)
    assert "kl_coef=0.1" in str(info.value) and "ref_log_prob" in str(info.value)
    with pytest.raises(ValueError) as info:
        fn(lp, olp, A, mask, ref_log_prob=ref_lp)
    assert "ref_log_prob" in str(info.value) and "kl_coef" in str(info.value)
    with pytest.raises(ValueError, match="ref_log_prob"):  # packed layout too
        fn(lp.reshape(-1), olp.reshape(-1), None, None, cu_seqlens=torch.tensor([0, 3, 8]), kl_coef=0.2)
    with pytest.raises(ValueError, match="kl_coef"):  # kl_type alone does not count as kl_coef
        fn(lp, olp, A, mask, ref_log_prob=ref_lp, kl_type="k1")
    with pytest.raises(ValueError, match="ref_log_prob"):  # a bound kl_coef, no ref_log_prob at the call
        irt.PolicyLoss("is_reshape", kl_coef=0.1)(lp, olp, A, mask) if path == "kernel" else \
            fn(lp, olp, A, mask, kl_coef=1e-3, kl_type="k3")
    # legal: no KL at all (kl_coef=0.0 counts as no KL), or an explicit kl_coef=0.0 with
    # ref_log_prob (the kl_loss metric without a penalty, e.g. a schedule that reaches 0)
    plain = fn(lp, olp, A, mask)
    assert torch.equal(fn(lp, olp, A, mask, kl_coef=0.0)[0], plain[0]) and "kl_loss" not in plain[1]
    loss, metrics = fn(lp, olp, A, mask, ref_log_prob=ref_lp, kl_coef=0.0)
    torch.testing.assert_close(loss, plain[0])
    assert metrics["kl_loss"] > 0
    loss = fn(lp, olp, A, mask, ref_log_prob=ref_lp, kl_coef=0.5)[0]
    torch.testing.assert_close(loss, plain[0] + 0.5 * metrics["kl_loss"])


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_kl_correction_is_checked_by_name(path):
    """An unknown kl_correction, or one with a "+" kl_type (which sets the gradient itself):
    a ValueError naming kl_correction on both paths."""
    fn = irt.policy_loss if path == "kernel" else ref.policy_loss
    lp, olp, A, mask = inputs()
    kl = dict(ref_log_prob=olp - 0.1, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_correction must be one of"):
        fn(lp, olp, A, mask, kl_correction="ratios", **kl)
    with pytest.raises(ValueError, match="kl_type='k3\\+' .* kl_correction"):
        fn(lp, olp, A, mask, kl_type="k3+", kl_correction="ratio", **kl)


def test_kl_coef_checks_its_type_before_the_pairing():
    with pytest.raises(TypeError, match="kl_coef"):
        call(kl_coef=True)
    with pytest.raises(ValueError, match="kl_coef"):
        call(kl_coef=-0.1)


def test_uses_kernels_takes_a_tensor_a_device_or_a_device_string(monkeypatch):
    """``irt.uses_kernels(x)``: True for CUDA devices and tensors, and for every device under
    TRITON_INTERPRET=1; anything else is a TypeError naming what it takes."""
    cpu = torch.zeros(2)
    for x in ("cpu", "cuda", "cuda:1", torch.device("cpu"), torch.device("cuda", 0), cpu):
        assert irt.uses_kernels(x) is True  # conftest sets TRITON_INTERPRET=1
    monkeypatch.delenv("TRITON_INTERPRET")
    for x in ("cuda", "cuda:1", torch.device("cuda"), torch.device("cuda", 0)):
        assert irt.uses_kernels(x) is True
    for x in ("cpu", torch.device("cpu"), cpu, "meta"):
        assert irt.uses_kernels(x) is False
    with pytest.raises(TypeError, match="tensor, a torch.device or a device string"):
        irt.uses_kernels(3)
    with pytest.raises(ValueError, match="not a device"):
        irt.uses_kernels("gpu0")
