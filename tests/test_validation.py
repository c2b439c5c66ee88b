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
