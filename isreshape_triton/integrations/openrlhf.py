"""OpenRLHF adapter (OpenRLHF 0.11): ``PolicyLoss`` with OpenRLHF's contract.

OpenRLHF's actor builds ``PolicyLoss(clip_eps_low, clip_eps_high, dual_clip,
token_level_loss, policy_loss_type, is_correction_level, is_correction_mode,
is_correction_gating, is_correction_threshold)`` and calls
``forward(log_probs, old_log_probs, advantages, action_mask, rollout_log_probs,
dp_size, batch_num_tokens, global_batch_size)``, which returns
``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``. This class takes the same
arguments, plus ``loss_type=`` (any of our families; default ``ppo_clip``, which
is OpenRLHF's ``policy_loss_type="ppo"``) and that family's parameters::

    from isreshape_triton.integrations.openrlhf import PolicyLoss
    actor_loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, loss_type="is_reshape", rho_min=0.3)

Mapping: ``clip_eps_low/high`` and ``dual_clip`` are ppo_clip's clip ratios and
``clip_ratio_c``; ``token_level_loss`` selects token-mean (``batch_num_tokens`` is the
global token count) or seq-mean-token-mean (``global_batch_size``); ``dp_size`` scales
the loss where that global count is given, as OpenRLHF's ``aggregate_loss``. The train/rollout
correction (``is_correction_*``) gives the per-token weight OpenRLHF multiplies the loss with
(kept ratio exp(old − rollout), its clamp, or 0 for rejected units): at the token level with the
ratio gate the op computes it from ``rollout_log_probs`` (``rollout_correction``: IcePop's mask
or TIS with a floor) with ``is_filter_ratio`` and ``vllm_kl``; the sequence gate and the
divergence gates are computed here and passed as ``rollout_is_weights`` (VESPO folds it into W).
``clip_ratio`` is the op's ``clipfrac`` (0 for families without clipping); every
metric of the op is kept in ``self.metrics`` after a call.

``policy_loss_type="gspo"`` is the family gspo with OpenRLHF's sequence ratio
exp(mean log(π/π_old)), or against ``rollout_log_probs`` when a correction level is set (and
no correction weight, as OpenRLHF), at the sequence level (seq-mean-token-mean), clipped by
``clip_eps_low/high``; OpenRLHF's GRPO advantages are one per sequence, where the token form is
OpenRLHF's loss and gradient (with per-token advantages OpenRLHF mixes them across the
sequence). Its log s is clamped at 10 as verl's (OpenRLHF does not clamp); ``dual_clip`` is
gspo's ``clip_ratio_c``, as for ppo.
"""
from __future__ import annotations

import torch

from .. import api
from ..params import RolloutCorrection, make_params

_GATINGS = ("ratio", "binary_kl", "tv")


def _masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's ``PolicyLoss`` contract around :func:`isreshape_triton.policy_loss`."""

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                 policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                 is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0), *, loss_type="ppo_clip",
                 **params):
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo' (other families: loss_type=), "
                             f"got {policy_loss_type!r}")
        if policy_loss_type == "gspo":
            loss_type, token_level_loss = "gspo", False
        if is_correction_level not in ("off", "token", "seq"):
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level!r}")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode!r}")
        if is_correction_gating not in _GATINGS:
            raise ValueError(f"is_correction_gating must be one of {_GATINGS}, got {is_correction_gating!r}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode='clip' requires is_correction_level='token' and "
                             "is_correction_gating='ratio'")
        if loss_type in ("ppo_clip", "gspo"):
            params = {"clip_ratio_low": clip_eps_low, "clip_ratio_high": clip_eps_high,
                      "clip_ratio_c": dual_clip, **params}
        self.token_level_loss = token_level_loss
        self.sequence_ratio = policy_loss_type == "gspo"
        self.is_correction = (is_correction_level, is_correction_mode, is_correction_gating,
                              tuple(is_correction_threshold))
        self.loss_type = loss_type
        self.params = make_params(loss_type, **params)
        self.metrics = {}
        # the token-level ratio gate is the op's rollout correction (the mask: IcePop's, the clip: TIS
        # with a floor); the sequence level's gate keeps its rows in the count and the divergence
        # gates read the probabilities: those weights are computed here (``correction``)
        low, high = self.is_correction[3]
        self.in_op = (RolloutCorrection("mask" if is_correction_mode == "mask" else "truncate", low, high)
                      if is_correction_level == "token" and is_correction_gating == "ratio" and low > 0 else None)

    def correction(self, old_log_probs, rollout_log_probs, action_mask):
        """(per-token weight, filtered fraction, vllm_kl) of OpenRLHF's train/rollout correction."""
        level, mode, gating, (low, high) = self.is_correction
        seq = level == "seq"
        mask = action_mask.to(old_log_probs.dtype)
        log_is = (old_log_probs - rollout_log_probs).detach()
        if gating == "ratio":
            stat = _masked_mean(log_is, mask, -1).unsqueeze(-1) if seq else log_is
            stat = stat.exp()
        else:
            p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            stat = (p - q).abs() if gating == "tv" else p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            stat = _masked_mean(stat, mask, -1).unsqueeze(-1) if seq else stat
        out = (stat < low) | (stat > high)
        weight = stat.clamp(low, high) if mode == "clip" else torch.where(out, 0.0, log_is.exp())
        filtered = out.to(mask.dtype).mean() if seq else _masked_mean(out.to(mask.dtype), mask)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
        return weight.expand_as(log_is), filtered, vllm_kl

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                dp_size=1, batch_num_tokens=None, global_batch_size=None):
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        options = {}  # OpenRLHF scales by dp_size only a loss over a given global count
        if self.token_level_loss and batch_num_tokens is not None:
            options.update(global_token_count=batch_num_tokens, dp_size=dp_size)
        if not self.token_level_loss and global_batch_size is not None:
            options.update(global_batch_size=global_batch_size, dp_size=dp_size)
        vllm_kl = filtered = None
        ppo_kl = None
        if self.sequence_ratio and self.is_correction[0] != "off":  # the ratio against the rollout policy
            if rollout_log_probs is None:
                raise ValueError("rollout_log_probs is required when is_correction_level != 'off'")
            mask = action_mask.to(log_probs.dtype)
            ppo_kl = _masked_mean((old_log_probs - log_probs).detach(), mask)
            old_log_probs = rollout_log_probs
        elif self.is_correction[0] != "off":
            if rollout_log_probs is None:
                raise ValueError("rollout_log_probs is required when is_correction_level != 'off'")
            if self.in_op is not None:  # the op computes the weights and both metrics
                options.update(rollout_log_prob=rollout_log_probs, rollout_correction=self.in_op)
            else:
                options["rollout_is_weights"], filtered, vllm_kl = self.correction(
                    old_log_probs, rollout_log_probs, action_mask)
        mode = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
        loss, self.metrics = api.policy_loss(log_probs, old_log_probs, advantages, action_mask, self.loss_type,
                                             mode, params=self.params, **options)
        if "rollout_log_prob" in options:  # OpenRLHF's filtered fraction: the ratio outside [low, high]
            filtered = self.metrics["rollout_is_fraction_high"] + self.metrics["rollout_is_fraction_low"]
            vllm_kl = self.metrics["rollout_kl"]
        clip_ratio = self.metrics.get("clipfrac", torch.zeros_like(self.metrics["ppo_kl"]))
        return loss, clip_ratio, self.metrics["ppo_kl"] if ppo_kl is None else ppo_kl, vllm_kl, filtered
