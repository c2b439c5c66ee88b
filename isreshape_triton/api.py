"""Public entry points (SPEC §7): ``policy_loss`` and the ``PolicyLoss`` module.

CUDA tensors run the fused Triton op; CPU tensors run the PyTorch reference,
unless ``TRITON_INTERPRET=1``, which runs the same Triton kernels on the CPU.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .params import AGG_MODES, make_params  # noqa: F401  (re-exported names)


def uses_kernels(t: torch.Tensor) -> bool:
    """True when ``policy_loss`` on tensors like ``t`` runs the Triton kernels."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                loss_type="is_reshape", loss_agg_mode="token-mean", **kwargs):
    """Aggregated loss and metrics dict for one family; see SPEC §2-6."""
    if isinstance(log_prob, torch.Tensor) and uses_kernels(log_prob):
        from .ops import fused_policy_loss

        return fused_policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                 loss_type, loss_agg_mode, **kwargs)
    return reference.policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                 loss_type, loss_agg_mode, **kwargs)


class PolicyLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`policy_loss` with the family and options bound."""

    def __init__(self, loss_type="is_reshape", loss_agg_mode="token-mean", **kwargs):
        super().__init__()
        agg_keys = ("dp_size", "global_token_count", "global_batch_size", "loss_scale_factor",
                    "log_ratio_clamp", "process_group")
        self.options = {k: kwargs.pop(k) for k in agg_keys if k in kwargs}
        self.loss_type = loss_type
        self.loss_agg_mode = loss_agg_mode
        self.params = make_params(loss_type, **kwargs)  # validates now, not at the first call
        if loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")

    def forward(self, log_prob, old_log_prob, advantages=None, response_mask=None, **overrides):
        options = {**self.options, **overrides}
        return policy_loss(log_prob, old_log_prob, advantages, response_mask, self.loss_type,
                           self.loss_agg_mode, params=self.params, **options)

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, loss_agg_mode={self.loss_agg_mode!r}, params={self.params}"
