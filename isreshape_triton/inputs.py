"""Input validation shared by the reference and the kernel path (SPEC §2, §11).

``prepare_inputs`` checks dtypes, shapes and devices, naming the argument in
every error, and returns views (no copies). Padded layout: ``[R, T]`` views, any
leading shape flattened to rows, ``[B]`` advantages a stride-0 ``[R, T]`` view.
Packed layout (``cu_seqlens``): 1-D ``[N]`` tensors, advantages ``[N]`` or
``[S]``; ``check_cu_seqlens`` reads the offsets (one sync) only when asked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Inputs:
    log_prob: torch.Tensor  # [R, T] (packed: [N])
    old_log_prob: torch.Tensor  # [R, T] (packed: [N])
    advantages: Optional[torch.Tensor]  # [R, T] (possibly stride-0 over T), packed [N] or [S]; None: SFT
    response_mask: Optional[torch.Tensor]  # like log_prob, or None (all count)
    shape: torch.Size  # the caller's shape of log_prob
    cu_seqlens: Optional[torch.Tensor] = None  # [S + 1] offsets of the packed layout
    rollout: Optional[torch.Tensor] = None  # rollout IS weights r, or rollout log-probs, like log_prob (SPEC §2)
    ref_log_prob: Optional[torch.Tensor] = None  # log π_ref for the KL term, like log_prob (SPEC §4.1)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def rows(self) -> int:
        """R (padded) or S (packed)."""
        return self.cu_seqlens.numel() - 1 if self.packed else self.log_prob.shape[0]


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


def _check_mask(response_mask, shape) -> None:
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dtype.is_complex:
        raise TypeError(f"response_mask must be bool, integer or float, got {response_mask.dtype}")
    if response_mask.shape != shape:
        raise ValueError(f"response_mask shape {tuple(response_mask.shape)} does not match "
                         f"log_prob shape {tuple(shape)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> None:
    """0 = c_0 ≤ c_1 ≤ … ≤ c_S = N (reads the values: one host sync)."""
    c = cu_seqlens.detach().to("cpu", torch.int64)
    if c[0] != 0 or c[-1] != n_tokens or bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {n_tokens} "
                         f"without decreasing, got {c.tolist()[:8]}{'...' if c.numel() > 8 else ''}")


def _token_streams(streams: dict, shape) -> dict:
    """Optional per-token float inputs (rollout IS weights, reference log-probs): checked like
    old_log_prob; returns the given ones."""
    given = {name: t for name, t in streams.items() if t is not None}
    for name, t in given.items():
        _check_tensor(name, t)
        if t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match log_prob shape {tuple(shape)}")
    return given


def _prepare_packed(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, validate,
                    rollout, ref_log_prob, rollout_name) -> Inputs:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of S + 1 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1] (S + 1 >= 1 offsets), got shape {tuple(cu_seqlens.shape)}")
    if log_prob.dim() != 1:
        raise ValueError(f"with cu_seqlens, log_prob must be 1-D [N] (packed), got shape {tuple(log_prob.shape)}")
    n, S = log_prob.shape[0], cu_seqlens.numel() - 1
    if S == 0 and n > 0:  # a shape check (no sync): the kernels' row search needs a row
        raise ValueError(f"cu_seqlens has no sequence (length 1) but log_prob has {n} tokens")
    # the kernels read the offsets with unit stride: a strided view (a column of a 2-D tensor)
    # becomes a contiguous device copy (no sync)
    cu_seqlens = cu_seqlens.contiguous()
    tensors = {"old_log_prob": old_log_prob, "cu_seqlens": cu_seqlens,
               **_token_streams({rollout_name: rollout, "ref_log_prob": ref_log_prob}, log_prob.shape)}
    if advantages is not None:
        _check_tensor("advantages", advantages)
        if advantages.shape not in ((n,), (S,)):
            raise ValueError(f"advantages shape {tuple(advantages.shape)} must be [N] = ({n},) per token "
                             f"or [S] = ({S},) per sequence")
        tensors["advantages"] = advantages
    if response_mask is not None:
        _check_mask(response_mask, log_prob.shape)
        tensors["response_mask"] = response_mask
    for name, t in tensors.items():
        if t.device != log_prob.device:
            raise ValueError(f"{name} is on {t.device} but log_prob is on {log_prob.device}")
    if validate:
        check_cu_seqlens(cu_seqlens, n)
    return Inputs(log_prob, old_log_prob, advantages, response_mask, log_prob.shape, cu_seqlens,
                  rollout, ref_log_prob)


def pad_packed(x: Inputs, max_len: int) -> Inputs:
    """The padded ``[S, max_len]`` form of a packed batch (differentiable copies; tokens
    outside the offsets and padding are masked out). Reference and PSIS only."""
    cu = x.cu_seqlens.to(torch.int64)
    S, n = cu.numel() - 1, x.log_prob.shape[0]
    pos = cu[:-1, None] + torch.arange(max_len, device=cu.device)[None, :]
    inside = pos < cu[1:, None]
    idx = pos.clamp(0, max(n - 1, 0))

    def gather(t, fill=0.0):
        if n == 0:  # an empty batch: nothing to gather, but the graph still reaches t (zero gradients)
            out = t.new_full((S, max_len), fill)
            return out + t.sum() * 0 if t.requires_grad else out
        return torch.where(inside, t[idx], torch.as_tensor(fill, dtype=t.dtype, device=t.device))

    mask = inside if x.response_mask is None else inside & (gather(x.response_mask, 0) != 0)
    adv = x.advantages
    if adv is not None:
        adv = gather(adv) if adv.shape[0] == n else adv[:, None].expand(S, max_len)  # [N] per token, else [S]
    optional = [None if t is None else gather(t) for t in (x.rollout, x.ref_log_prob)]
    return Inputs(gather(x.log_prob), gather(x.old_log_prob), adv, mask, torch.Size((S, max_len)), None,
                  *optional)


def prepare_inputs(log_prob, old_log_prob, advantages, response_mask,
                   log_ratio_clamp: float = 20.0, cu_seqlens=None, validate: bool = False,
                   rollout_is_weights=None, ref_log_prob=None, rollout_log_prob=None) -> Inputs:
    """The checked inputs as [R, T] row views (or packed [N]); the rollout stream holds
    ``rollout_is_weights`` or ``rollout_log_prob`` (``params.rollout_config`` lets one through)."""
    rollout_name = "rollout_is_weights" if rollout_log_prob is None else "rollout_log_prob"
    if rollout_log_prob is not None:
        rollout_is_weights = rollout_log_prob
    _check_tensor("log_prob", log_prob)
    _check_tensor("old_log_prob", old_log_prob)
    if log_prob.dim() < 1:
        raise ValueError("log_prob must have at least one dimension (..., T)")
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(f"old_log_prob shape {tuple(old_log_prob.shape)} does not match "
                         f"log_prob shape {tuple(log_prob.shape)}")
    if not (isinstance(log_ratio_clamp, (int, float, torch.SymFloat)) and 0 < log_ratio_clamp < math.inf):
        raise ValueError(f"log_ratio_clamp must be a finite number > 0, got {log_ratio_clamp!r}")
    if cu_seqlens is not None:
        return _prepare_packed(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, validate,
                               rollout_is_weights, ref_log_prob, rollout_name)
    device = log_prob.device
    shape = log_prob.shape
    if log_prob.dim() == 1:  # a single sequence
        lead, T = (1,), shape[0]
    else:
        lead, T = tuple(shape[:-1]), shape[-1]
    rows = math.prod(lead)

    optional = _token_streams({rollout_name: rollout_is_weights, "ref_log_prob": ref_log_prob}, shape)
    tensors = {"old_log_prob": old_log_prob, **optional}
    if advantages is not None:
        _check_tensor("advantages", advantages)
        if advantages.shape != shape and advantages.shape != shape[:-1]:
            raise ValueError(f"advantages shape {tuple(advantages.shape)} must equal log_prob shape "
                             f"{tuple(shape)} or its leading shape {tuple(shape[:-1])}")
        tensors["advantages"] = advantages
    if response_mask is not None:
        _check_mask(response_mask, shape)
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
    rollout, ref = (None if t is None else _rows_view(name, t, rows, T)
                    for name, t in ((rollout_name, rollout_is_weights), ("ref_log_prob", ref_log_prob)))
    return Inputs(lp, olp, adv, mask, shape, None, rollout, ref)


def per_token_advantages(x: Inputs) -> torch.Tensor:
    """[N] advantages of a packed batch ([S] ones repeated over each sequence's tokens)."""
    adv = x.advantages
    n = x.log_prob.shape[0]
    if adv.shape[0] == n:
        return adv
    pos = torch.arange(n, device=adv.device)
    row = torch.searchsorted(x.cu_seqlens.to(torch.int64), pos, right=True) - 1
    return adv[row.clamp(0, adv.shape[0] - 1)]
