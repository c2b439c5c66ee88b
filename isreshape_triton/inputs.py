"""Input validation shared by the reference and the kernel path (SPEC §2, §11).

``prepare_inputs`` checks dtypes, shapes and devices, naming the argument in
every error, and returns ``[R, T]`` views (no copies): any leading shape is
flattened to rows, ``[B]`` advantages become a stride-0 ``[R, T]`` view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Inputs:
    log_prob: torch.Tensor  # [R, T]
    old_log_prob: torch.Tensor  # [R, T]
    advantages: Optional[torch.Tensor]  # [R, T] (possibly stride-0 over T) or None (SFT: A ≡ 1)
    response_mask: Optional[torch.Tensor]  # [R, T] or None (all count)
    shape: torch.Size  # the caller's shape of log_prob


def _check_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _rows_view(name: str, t: torch.Tensor, rows: int, T: int) -> torch.Tensor:
    try:
        return t.reshape(rows, T) if t.dim() != 2 else t
    except RuntimeError as e:  # pragma: no cover - reshape of a valid shape never fails
        raise ValueError(f"{name}: cannot view as [{rows}, {T}]") from e


def prepare_inputs(log_prob, old_log_prob, advantages, response_mask,
                   log_ratio_clamp: float = 20.0) -> Inputs:
    _check_tensor("log_prob", log_prob)
    _check_tensor("old_log_prob", old_log_prob)
    if log_prob.dim() < 1:
        raise ValueError("log_prob must have at least one dimension (..., T)")
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(f"old_log_prob shape {tuple(old_log_prob.shape)} does not match "
                         f"log_prob shape {tuple(log_prob.shape)}")
    if not (isinstance(log_ratio_clamp, (int, float)) and log_ratio_clamp > 0
            and math.isfinite(log_ratio_clamp)):
        raise ValueError(f"log_ratio_clamp must be a finite number > 0, got {log_ratio_clamp!r}")
    device = log_prob.device
    shape = log_prob.shape
    if log_prob.dim() == 1:  # a single sequence
        lead, T = (1,), shape[0]
    else:
        lead, T = tuple(shape[:-1]), shape[-1]
    rows = math.prod(lead)

    tensors = {"old_log_prob": old_log_prob}
    if advantages is not None:
        _check_tensor("advantages", advantages)
        if advantages.shape != shape and advantages.shape != shape[:-1]:
            raise ValueError(f"advantages shape {tuple(advantages.shape)} must equal log_prob shape "
                             f"{tuple(shape)} or its leading shape {tuple(shape[:-1])}")
        tensors["advantages"] = advantages
    if response_mask is not None:
        if not isinstance(response_mask, torch.Tensor):
            raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
        if response_mask.dtype.is_complex:
            raise TypeError(f"response_mask must be bool, integer or float, got {response_mask.dtype}")
        if response_mask.shape != shape:
            raise ValueError(f"response_mask shape {tuple(response_mask.shape)} does not match "
                             f"log_prob shape {tuple(shape)}")
        tensors["response_mask"] = response_mask
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but log_prob is on {device}")

    lp = _rows_view("log_prob", log_prob, rows, T)
    olp = _rows_view("old_log_prob", old_log_prob, rows, T)
    adv = None
    if advantages is not None:
        if advantages.shape == shape:
            adv = _rows_view("advantages", advantages, rows, T)
        else:
            adv = advantages.reshape(rows, 1).expand(rows, T)
    mask = None if response_mask is None else _rows_view("response_mask", response_mask, rows, T)
    return Inputs(lp, olp, adv, mask, shape)
