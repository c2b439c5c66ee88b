"""Public entry points (SPEC §7): ``policy_loss`` and the ``PolicyLoss`` module.

CUDA tensors run the fused Triton op; CPU tensors run the PyTorch reference,
unless ``TRITON_INTERPRET=1``, which runs the same Triton kernels on the CPU.
"""
from __future__ import annotations

import os
import sys

import torch

from . import reference
from .boundary import compile_boundary
from .params import (AGG_MODES, CALL_OPTIONS, AggConfig, check_log_ratio_clamp,  # noqa: F401
                     check_loss_type, check_process_group, make_params)

_AGG_FIELDS = ("dp_size", "global_token_count", "global_batch_size", "loss_scale_factor")


def uses_kernels(t) -> bool:
    """True when ``policy_loss`` on tensors like ``t`` runs the Triton kernels: ``t`` is a
    tensor, a ``torch.device`` or a device string ("cuda", "cuda:1", "cpu"); True for CUDA,
    and for every device when ``TRITON_INTERPRET=1``."""
    if isinstance(t, torch.Tensor):
        device = t.device
    elif isinstance(t, (str, torch.device)):
        try:
            device = torch.device(t)
        except RuntimeError as e:
            raise ValueError(f"uses_kernels: {t!r} is not a device ({e})") from None
    else:
        raise TypeError(f"uses_kernels takes a tensor, a torch.device or a device string, got {type(t).__name__}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        check_interpreter()
        return True
    return device.type == "cuda"


_interpreter_checked = False  # triton was found loaded in interpreter mode (it stays so)


def check_interpreter() -> None:
    """A clear RuntimeError when ``TRITON_INTERPRET=1`` was set after triton was imported.

    Triton reads the variable when a function is decorated, so a triton imported before it
    holds compiled (``JITFunction``) library functions, and a kernel run on CPU tensors fails
    deep inside with "Cannot call @triton.jit'd outside of the scope of a kernel" or "0 active
    drivers". Checked once triton is loaded (then never again): its standard library holds no
    ``JITFunction`` in interpreter mode (``InterpretedFunction`` instead)."""
    global _interpreter_checked
    if _interpreter_checked or torch.compiler.is_compiling():
        return
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return  # triton is not loaded yet: it reads TRITON_INTERPRET=1 when it is
    from triton.runtime.jit import JITFunction

    if any(isinstance(v, JITFunction) for v in vars(standard).values()):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so Triton is not in "
                           "interpreter mode: set TRITON_INTERPRET=1 before anything imports triton "
                           "(in the environment, or first in the program: torch.compile imports triton too)")
    _interpreter_checked = True


def _check_call_options(options: dict) -> dict:
    """Validate the shared keyword options (``process_group``, ``log_ratio_clamp``);
    numbers come back as Python floats, so both paths see the same values."""
    options = dict(options)
    check_process_group(options.get("process_group"))
    if "log_ratio_clamp" in options:
        options["log_ratio_clamp"] = check_log_ratio_clamp(options["log_ratio_clamp"])
    return options


@compile_boundary
def policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                loss_type="is_reshape", loss_agg_mode="token-mean", **kwargs):
    """Aggregated loss and metrics dict for one family; see SPEC §2-6."""
    kwargs = _check_call_options(kwargs)
    if isinstance(log_prob, torch.Tensor) and uses_kernels(log_prob):
        from .ops import fused_policy_loss

        return fused_policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                 loss_type, loss_agg_mode, **kwargs)
    return reference.policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                 loss_type, loss_agg_mode, **kwargs)


class PolicyLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`policy_loss` with the family and options bound.

    Everything is validated when the module is built. A call may override any bound
    option for that call only: ``loss_agg_mode``, the aggregation options, ``params=``
    or single family parameters (``loss(..., loss_agg_mode="seq-mean-token-sum",
    gamma=0.5)``); ``loss_type`` is fixed (build another module for another family).
    """

    def __init__(self, loss_type="is_reshape", loss_agg_mode="token-mean", *, params=None, **kwargs):
        super().__init__()
        check_loss_type(loss_type)
        options = {k: kwargs.pop(k) for k in CALL_OPTIONS if k in kwargs}
        self.loss_type = loss_type
        self.params = make_params(loss_type, params, **kwargs)  # validates now, not at the first call
        AggConfig(loss_agg_mode, **{k: options[k] for k in _AGG_FIELDS if k in options})
        self.loss_agg_mode = loss_agg_mode
        self.options = _check_call_options(options)

    def forward(self, log_prob, old_log_prob, advantages=None, response_mask=None, **overrides):
        if "loss_type" in overrides:
            raise TypeError(f"loss_type is fixed when PolicyLoss is built (loss_type="
                            f"{self.loss_type!r}); build another PolicyLoss for "
                            f"loss_type={overrides['loss_type']!r}")
        mode = overrides.pop("loss_agg_mode", self.loss_agg_mode)
        params = overrides.pop("params", self.params)
        family = {k: overrides.pop(k) for k in list(overrides) if k not in CALL_OPTIONS}
        options = {**self.options, **overrides}  # family overrides are applied (and validated) by policy_loss
        return policy_loss(log_prob, old_log_prob, advantages, response_mask, self.loss_type,
                           mode, params=params, **family, **options)

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, loss_agg_mode={self.loss_agg_mode!r}, params={self.params}"
