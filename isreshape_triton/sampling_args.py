"""The arguments and the result of ``irt.optimal_sampling`` (SPEC §9): the checks both paths run
(every error names its argument) and the record they return. The kernel path (``sampling.py``)
and the reference (``reference/sampling.py``) import this module; it imports neither."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

METHODS = ("kl_symmetry", "snr")


class SamplingResult(NamedTuple):
    """Per row (leading shape of the logits): the drawn token, α, log q*(token),
    log π_θ(token), log π_t(token), KL(q*‖π_θ), KL(q*‖π_t), whether α sits at a bound of [0, 1]
    because the equation has no interior root (or the SNR no interior maximum), and log q* over the
    vocabulary when asked for (else None). Floats are fp32; tokens int64 (−1 for an invalid row)."""

    tokens: torch.Tensor
    alpha: torch.Tensor
    log_q: torch.Tensor
    log_p_policy: torch.Tensor
    log_p_target: torch.Tensor
    kl_q_policy: torch.Tensor
    kl_q_target: torch.Tensor
    alpha_at_bound: torch.Tensor
    log_q_full: Optional[torch.Tensor]


@dataclass(frozen=True)
class SamplingConfig:
    """Validated options: ``method`` is "kl_symmetry", "snr" or "fixed" (then ``alpha`` is set)."""

    method: str
    alpha: Optional[float]
    temperature: float
    return_log_q: bool


def _check_logits(name: str, t, like: Optional[torch.Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (logits), got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [N, V] (or [..., V]), got {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension, got {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of logits_policy {tuple(like.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but logits_policy is on {like.device}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate(logits_policy, logits_target, method="kl_symmetry", temperature=1.0, ref_logits=None,
             generator=None, return_log_q=False) -> SamplingConfig:
    """Check every argument (errors name it) and return the normalised options."""
    _check_logits("logits_policy", logits_policy)
    _check_logits("logits_target", logits_target, logits_policy)
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} or a float alpha in [0, 1], got {method!r}")
        name, alpha = method, None
    elif _real(method):
        alpha = float(method)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"method as a fixed alpha must lie in [0, 1], got {method!r}")
        name = "fixed"
    else:
        raise TypeError(f"method must be one of {METHODS} or a float alpha in [0, 1], got {method!r}")
    if not _real(temperature):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if ref_logits is not None:
        if name != "snr":
            raise ValueError("ref_logits (π_ref of the SNR reward) is only used by method='snr'")
        _check_logits("ref_logits", ref_logits, logits_policy)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu" and generator.device != logits_policy.device:
        raise ValueError(f"generator is on {generator.device} but the logits are on {logits_policy.device}")
    if not isinstance(return_log_q, bool):
        raise TypeError(f"return_log_q must be a bool, got {return_log_q!r}")
    return SamplingConfig(name, alpha, float(temperature), return_log_q)
