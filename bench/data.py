"""The built-in synthetic batch: ragged response masks and a realistic log-ratio spread."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    log_prob: torch.Tensor  # [B, T] leaf, requires grad
    old_log_prob: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T] (GRPO-style: constant per row, stored per token as in verl)
    response_mask: torch.Tensor  # [B, T] bool, ragged: each row a prefix of random length

    @property
    def shape(self):
        return tuple(self.log_prob.shape)

    @property
    def positions(self) -> int:
        return self.log_prob.numel()

    @property
    def counted(self) -> int:
        return int(self.response_mask.sum())


def make_batch(B: int, T: int, dtype=torch.float32, device="cpu", seed: int = 0) -> Batch:
    """Synthetic policy-gradient batch.

    * response lengths uniform in [T/8, T] (ragged right padding, mask = prefix);
    * old log-probs: -|N(0, 1.5)| - 0.05 (sampled tokens are mostly likely);
    * log-ratio ℓ = log π_θ − log μ: N(0.01, 0.05²) for most tokens, 2 % of tokens
      with a heavy tail N(0, 1²) (stale or off-policy tokens), so σ² is realistic
      and a few weights are far from 1;
    * advantages: GRPO-style group-normalised score per row, ~N(0, 1), broadcast to T;
    * padded positions hold garbage (large values), which must never matter.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, T // 8), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -(torch.randn(B, T, generator=g) * 1.5).abs() - 0.05
    spread = torch.where(torch.rand(B, T, generator=g) < 0.02, torch.randn(B, T, generator=g),
                         0.01 + 0.05 * torch.randn(B, T, generator=g))
    new = old + spread
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    garbage = torch.full((B, T), 1e4)
    new, old, adv = (torch.where(mask, x, garbage) for x in (new, old, adv))
    return Batch(new.to(device=device, dtype=dtype).requires_grad_(True),
                 old.to(device=device, dtype=dtype), adv.to(device=device, dtype=dtype),
                 mask.to(device))
