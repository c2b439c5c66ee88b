"""The fused op: ``fused_policy_loss`` = validation, the PSIS context where the γ rule needs
it, then the custom op, whose forward runs the launches ``plan_launches`` lists.

Forward: ``batch_stats_kernel`` (only families whose γ or weight needs batch or
row statistics) and ``token_loss_kernel`` (φ, F, −m·φ, metric partials; its last
program finalizes the loss, the metrics and the gradient scale). Backward:
``policy_grad_kernel``, grad = (−m·φ)·s·grad_out, in log_prob's dtype. So 1 or
2 launches forward, 1 backward, no host sync: every count, γ and denominator
stays on the device, also for ``gamma="psis"``, whose smoothing runs as torch
ops before the loss pass. A family's token selection adds its launches (``selection.py``).

Launch planning: ``launch.py``; the custom op and its autograd: ``custom_op.py``; the PSIS
context: ``psis_context.py``.
"""
from __future__ import annotations

import dataclasses

import torch

from .custom_op import run_fused
from .families import FAMILIES, kernel_family
from .inputs import Inputs, prepare_inputs
from .kernels import layout
from .metrics import metric_names
from .options import as_number
from .launch import acc_dtype
from .params import (AggConfig, check_correction_family, check_log_ratio_clamp, check_process_group, correction_args,
                     kl_config, make_params, rollout_config)
from .reference.loss import counted
from .reference.rollout import log_ratio, token_keep
from .psis_context import psis_context

#: a family's metric → its slot in the metric vector (the common ones, then its extras in order)
_METRIC_SLOTS = {loss_type: {**layout.METRIC_SLOTS, **{name: layout.M_EXTRAS.value + k
                                                       for k, name in enumerate(family.extra_metrics)}}
                 for loss_type, family in FAMILIES.items()}


def fused_policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                      loss_type="is_reshape", loss_agg_mode="token-mean", *, dp_size=1,
                      global_token_count=None, global_batch_size=None, loss_scale_factor=None,
                      log_ratio_clamp=20.0, cu_seqlens=None, validate=False, rollout_is_weights=None,
                      ref_log_prob=None, kl_coef=None, kl_type="low_var_kl", kl_correction=None,
                      process_group=None, rollout_log_prob=None, rollout_correction=None, params=None,
                      **family_params):
    """``irt.policy_loss`` on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    With ``process_group`` every rank merges the statistics records of all ranks, so γ
    is that of the concatenated global batch and bit-identical on every rank.
    """
    check_process_group(process_group)
    log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
    params = make_params(loss_type, params, **family_params)
    agg = AggConfig(loss_agg_mode, dp_size, global_token_count, global_batch_size, loss_scale_factor)
    kl = kl_config(kl_coef, kl_type, ref_log_prob, kl_correction)
    correction = rollout_config(rollout_is_weights, rollout_log_prob, rollout_correction)
    check_correction_family(correction, loss_type, params)
    x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, log_ratio_clamp,
                       cu_seqlens, validate, rollout_is_weights, ref_log_prob, rollout_log_prob)
    agg.check_device(x.log_prob.device)
    mask = x.response_mask
    if mask is not None and mask.dtype.is_floating_point and mask.element_size() == 1:
        mask = mask != 0  # fp8: Triton cannot compare it with 0 on every target
    fam = kernel_family(loss_type, params)
    gamma, extra = (None, {})
    if fam.psis:
        gamma, extra = psis_context(_rejected(x, correction, log_ratio_clamp), params, fam,
                                    as_number(log_ratio_clamp), process_group)
    write_grad = torch.is_grad_enabled() and x.log_prob.requires_grad
    loss, metric_vec = run_fused(x, mask, gamma, fam, agg, kl, as_number(log_ratio_clamp), write_grad,
                                 process_group, correction_args(correction))
    slots = _METRIC_SLOTS[loss_type]
    metrics = {name: extra[name] if name in extra else metric_vec[slots[name]]
               for name in metric_names(loss_type, params, kl=x.ref_log_prob is not None,
                                        rollout=correction is not None)}
    return loss, metrics


def _rejected(x: Inputs, correction, clamp) -> Inputs:
    """``x`` with the rollout correction's token rejection out of the mask, for the PSIS context
    (torch ops, as the context's own; the kernels reject the same tokens). A row rejection only
    goes with a per-row context (``check_correction_family``), where a rejected row's is unused."""
    if correction is None or correction.reject is None or correction.reject_level != "token":
        return x
    mask = counted(x.response_mask, x.log_prob)
    lr = log_ratio(x.log_prob, x.old_log_prob, x.rollout, mask, correction, acc_dtype(x.log_prob.dtype))
    return dataclasses.replace(x, response_mask=mask & token_keep(lr, correction, as_number(clamp)))
