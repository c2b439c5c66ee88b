"""TRL adapter (TRL 1.16): ``GRPOTrainer``'s policy loss through the op.

:func:`grpo_policy_loss` computes what ``GRPOTrainer._compute_loss`` computes from
the per-token log-probs, for ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo / cispo / sapo
/ vespo, with TRL's normalizers written as aggregation modes (SPEC §5):

=================  ==========================  =====================================================
TRL ``loss_type``  family (default)            aggregation
=================  ==========================  =====================================================
grpo, sapo         ppo_clip, sapo              seq-mean-token-mean, global_batch_size = B·acc
bnpo               ppo_clip                    token-mean, global_token_count = max(Σm, 1)·acc
dr_grpo            ppo_clip                    seq-mean-token-sum-norm, global_batch_size = B·acc,
                                               loss_scale_factor = max_completion_length
dapo, cispo,       ppo_clip, cispo, vespo      token-mean, global_token_count =
vespo                                          max(num_items_in_batch, 1)/processes·acc/steps_per_gen
luspo              ppo_clip                    seq-mean-token-sum, global_batch_size = B·acc
=================  ==========================  =====================================================

``importance_sampling_level="sequence"`` (grpo, bnpo, dr_grpo, dapo, luspo) uses the family
gspo: TRL's sequence ratio exp(mean_t log-ratio) with its clip and ``delta``, the same loss and
gradient when the advantages are one per sequence (TRL's ``[B]``; per-token advantages are
refused there, TRL mixes them across the sequence), its log clamped at 10 as verl's (TRL does
not clamp).

(acc: gradient-accumulation steps in training, 1 in evaluation; ``num_items_in_batch``
stays a tensor: no sync.) ``epsilon_low`` / ``epsilon_high`` are the clip ratios with
the dual clip off (TRL has none) and ``delta`` caps the unclipped ratio; for cispo
``epsilon_high`` is the ratio's upper bound (clipped above only, ``clip_ratio_low=None``,
``clip_ratio_high = epsilon_high − 1``); ``sapo_temperature_pos/neg`` are τ_pos/τ_neg;
``vespo_k_*`` / ``vespo_lambda_*`` VESPO's (k, λ); ``importance_sampling_ratio`` is
``rollout_is_weights`` (a per-sequence ``[B, 1]`` ratio r is spread as r^(1/n_b) over
the row's n_b tokens for VESPO, whose log W sums it); ``beta`` is ``kl_coef`` of the
k3 (``low_var_kl``) term against ``ref_per_token_logps``, weighted by the token ratio w with
``use_bias_correction_kl`` (``kl_correction="ratio"``). ``family=`` swaps the
per-token loss for any of ours (``"is_reshape"``, ...) under the same normalizer.

:class:`IRTGRPOTrainer` is ``GRPOTrainer`` with ``_compute_loss`` computing the
log-probs as TRL does and the loss with :func:`grpo_policy_loss`::

    trainer = IRTGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(loss_type="dapo"),
                             train_dataset=..., irt_loss_type="is_reshape", irt_params={"rho_min": 0.3})

Differences from TRL: VESPO's loss *value* is our surrogate −φ·A·(log π − log π_old)
(zero on-policy) where TRL logs −φ·A·log π; gradients are identical. TRL's entropy
bonus (``entropy_coef``, ``use_adaptive_entropy``) and a MoE model's router aux loss are added
to the op's loss as TRL adds them, from the entropies and aux loss of TRL's own forward.
``top_entropy_quantile`` and ``off_policy_mask_threshold`` (OPSM) give TRL's masks of the
per-token policy loss, computed by TRL's own methods (eager, in the trainer: the entropy
quantile gathers across processes as TRL does) and passed to the op as factors of its rollout
weights (``policy_mask``); not with VESPO, whose rollout weights enter its row weight.
Refused when the trainer is built: those two with VESPO, ``use_bias_correction_kl`` with a KL
term at the sequence level. The from-logits op is not used:
TRL's own fused LM head already computes the log-probs from the hidden states
without materializing logits, which our from-logits op would need.
"""
from __future__ import annotations

import torch
from trl import GRPOTrainer

from .. import api
from ..families import FAMILIES

#: TRL loss_type → (our default family, aggregation mode)
TRL_LOSS_TYPES = {
    "grpo": ("ppo_clip", "seq-mean-token-mean"),
    "bnpo": ("ppo_clip", "token-mean"),
    "dr_grpo": ("ppo_clip", "seq-mean-token-sum-norm"),
    "dapo": ("ppo_clip", "token-mean"),
    "cispo": ("cispo", "token-mean"),
    "luspo": ("ppo_clip", "seq-mean-token-sum"),
    "sapo": ("sapo", "seq-mean-token-mean"),
    "vespo": ("vespo", "token-mean"),
}
SEQUENCE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's sequence ratio: gspo
#: TRL's token-level metric → the sum of our family's metrics it is (token means over all processes)
TRL_METRICS = {"ppo_clip": {"clip_ratio/low_mean": ("low_clipped",), "clip_ratio/high_mean": ("high_clipped",),
                            "clip_ratio/region_mean": ("low_clipped", "high_clipped")},
               "cispo": {"cispo_clip_ratio": ("clipfrac_upper",)}}
_MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
            "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _check_loss_type(loss_type):
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(TRL_LOSS_TYPES)} for the op, got {loss_type!r}")


def default_family(loss_type: str, importance_sampling_level: str = "token") -> str:
    """Our family for TRL's ``loss_type`` at its ``importance_sampling_level``."""
    _check_loss_type(loss_type)
    if importance_sampling_level == "token":
        return TRL_LOSS_TYPES[loss_type][0]
    if importance_sampling_level != "sequence":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if loss_type not in SEQUENCE_LOSS_TYPES:
        raise ValueError(f"importance_sampling_level='sequence' takes loss_type in {SEQUENCE_LOSS_TYPES} for the "
                         f"op, got {loss_type!r}")
    return "gspo"


def _rollout_weights(ratio, mask, family, shape):
    """TRL's ``importance_sampling_ratio`` (``[B, T]`` or per sequence ``[B, 1]``) as the
    op's per-token ``rollout_is_weights``."""
    if ratio.shape == shape:
        return ratio
    if family == "vespo":  # Σ_t m_t·log r^(1/n_b) = log r
        n = mask.sum(-1, keepdim=True).clamp(min=1).to(ratio.dtype)
        ratio = ratio.pow(1.0 / n)
    return ratio.expand(shape)


def grpo_policy_loss(per_token_logps, old_per_token_logps, advantages, mask, *, loss_type="dapo",
                     family=None, params=None, epsilon_low=0.2, epsilon_high=0.2,
                     delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                     vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, beta=0.0,
                     ref_per_token_logps=None, importance_sampling_ratio=None, num_items_in_batch=None,
                     num_processes=1, accumulation_steps=1, steps_per_generation=1,
                     max_completion_length=None, importance_sampling_level="token", use_bias_correction_kl=False,
                     policy_mask=None):
    """(loss, metrics) of ``GRPOTrainer._compute_loss`` for ``loss_type`` (see the module
    docstring), the per-token loss computed by ``family`` (default: TRL's own). ``policy_mask``:
    the 0/1 weight ([B, T] or per sequence [B, 1]) TRL multiplies the per-token policy loss with
    (its off-policy sequence mask and high-entropy mask), not the KL term nor the normalizer."""
    family = family or default_family(loss_type, importance_sampling_level)
    mode = TRL_LOSS_TYPES[loss_type][1]
    rows = per_token_logps.shape[0]
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages.reshape(rows)  # per sequence: [B]
    if importance_sampling_level == "sequence" and advantages.dim() != 1:
        raise ValueError("importance_sampling_level='sequence' needs one advantage per sequence ([B] or "
                         f"[B, 1]), got advantages of shape {tuple(advantages.shape)}")
    agg = {}
    if loss_type in ("grpo", "sapo", "dr_grpo", "luspo"):
        agg["global_batch_size"] = rows * accumulation_steps
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length is required for loss_type='dr_grpo'")
        agg["loss_scale_factor"] = max_completion_length
    elif loss_type == "bnpo":
        agg["global_token_count"] = mask.sum().clamp(min=1.0) * accumulation_steps
    elif loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"num_items_in_batch is required for loss_type={loss_type!r}")
        n = torch.as_tensor(num_items_in_batch, device=per_token_logps.device)
        agg["global_token_count"] = n.clamp(min=1.0) / num_processes * (accumulation_steps / steps_per_generation)
    kwargs = dict(params or {})
    if family == "ppo_clip":
        kwargs = {"clip_ratio_low": epsilon_low, "clip_ratio_high": epsilon_high, "clip_ratio_c": None,
                  "delta": delta, **kwargs}
    elif family == "gspo":
        kwargs = {"clip_ratio_low": epsilon_low, "clip_ratio_high": epsilon_high, "delta": delta, **kwargs}
    elif family == "cispo":
        kwargs = {"clip_ratio_low": None, "clip_ratio_high": epsilon_high - 1.0, **kwargs}
    elif family == "sapo":
        kwargs = {"tau_pos": sapo_temperature_pos, "tau_neg": sapo_temperature_neg, **kwargs}
    elif family == "vespo":
        kwargs = {"k_pos": vespo_k_pos, "lambda_pos": vespo_lambda_pos, "k_neg": vespo_k_neg,
                  "lambda_neg": vespo_lambda_neg, **kwargs}
    weights = None
    if importance_sampling_ratio is not None:
        weights = _rollout_weights(importance_sampling_ratio, mask, family, per_token_logps.shape)
    if policy_mask is not None:  # a factor of the policy term per token: the op's rollout weights
        if FAMILIES[family].rollout_in_row:
            raise ValueError(f"policy_mask (TRL's off_policy_mask_threshold, top_entropy_quantile) weighs each "
                             f"token's policy loss, which {family}'s row weight of the rollout weights does not "
                             f"express")
        policy_mask = policy_mask.to(per_token_logps.dtype).expand(per_token_logps.shape)
        weights = policy_mask if weights is None else weights * policy_mask
    if weights is not None:
        kwargs["rollout_is_weights"] = weights
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("ref_per_token_logps is required when beta != 0")
        if use_bias_correction_kl and importance_sampling_level == "sequence":
            raise ValueError("use_bias_correction_kl weighs the KL by the sequence ratio at "
                             "importance_sampling_level='sequence', which the op does not express")
        kwargs.update(ref_log_prob=ref_per_token_logps, kl_coef=beta, kl_type="low_var_kl",
                      kl_correction="ratio" if use_bias_correction_kl else None)
    return api.policy_loss(per_token_logps, old_per_token_logps, advantages, mask, family, mode,
                           **agg, **kwargs)


class IRTGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose policy loss is :func:`grpo_policy_loss`.

    ``irt_loss_type``: our family for the per-token loss (default: the one of TRL's
    ``loss_type``); ``irt_params``: its parameters. Metrics: TRL's ``entropy``, TRL's token-level
    clip ratios (:data:`TRL_METRICS`; not TRL's per-sequence ``clip_ratio/low_min`` and
    ``high_max``) and the op's metrics as ``irt/<name>`` (means over processes), one host read
    per step.
    """

    def __init__(self, *args, irt_loss_type=None, irt_params=None, **kwargs):
        super().__init__(*args, **kwargs)
        _check_loss_type(self.loss_type)
        a = self.args
        self.irt_loss_type = irt_loss_type or default_family(self.loss_type, self.importance_sampling_level)
        api.PolicyLoss(self.irt_loss_type, **(irt_params or {}))  # validate now, not at the first step
        self.irt_params = dict(irt_params or {})
        in_row = FAMILIES[self.irt_loss_type].rollout_in_row  # no per-token factor of the policy loss
        refused = {
            "top_entropy_quantile with a row-weight family": in_row and self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold with a row-weight family": in_row and self.off_policy_mask_threshold is not None,
            # TRL weighs the KL by the sequence ratio there, mixing the tokens of a sequence
            "use_bias_correction_kl at the sequence level": (bool(getattr(a, "use_bias_correction_kl", False))
                                                             and self.beta != 0.0
                                                             and self.importance_sampling_level == "sequence"),
        }
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise ValueError(f"IRTGRPOTrainer cannot express these GRPOConfig options for {self.irt_loss_type}: "
                             f"{bad}")

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1), completion_ids.size(1),
            compute_entropy=True, compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in _MM_KEYS})
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
        ratio = inputs.get("importance_sampling_ratio") if (vllm_is or self.loss_type == "vespo") else None
        mode = "train" if self.model.training else "eval"
        acc = self.current_gradient_accumulation_steps if mode == "train" else 1
        a = self.args
        entropy_mask, policy_mask = self._policy_masks(per_token_logps, old, entropies, mask, inputs)
        loss, metrics = grpo_policy_loss(
            per_token_logps, old, inputs["advantages"], mask, loss_type=self.loss_type,
            family=self.irt_loss_type, params=self.irt_params, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, delta=a.delta, sapo_temperature_pos=a.sapo_temperature_pos,
            sapo_temperature_neg=a.sapo_temperature_neg, vespo_k_pos=a.vespo_k_pos,
            vespo_lambda_pos=a.vespo_lambda_pos, vespo_k_neg=a.vespo_k_neg, vespo_lambda_neg=a.vespo_lambda_neg,
            beta=self.beta, ref_per_token_logps=inputs.get("ref_per_token_logps"),
            importance_sampling_ratio=ratio, num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes, accumulation_steps=acc,
            steps_per_generation=a.steps_per_generation if mode == "train" else 1,
            max_completion_length=self.max_completion_length,
            importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=bool(getattr(a, "use_bias_correction_kl", False)), policy_mask=policy_mask)
        per_process = {}  # TRL's metrics that are means over processes
        if self._entropy_bonus_enabled:  # TRL's policy_loss: before TRL divides it by the accumulation steps
            per_process["policy_loss"] = loss.detach() * (1 if self.loss_type in ("dapo", "cispo", "vespo") else acc)
            bonus_mask = mask if entropy_mask is None else mask * entropy_mask  # TRL's effective mask
            loss = loss - self._entropy_bonus(entropies, bonus_mask, mode, acc)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / acc
            per_process["aux_loss"] = aux_loss.detach()
        self._log_irt_metrics(mode, entropies, mask, metrics, per_process)
        return loss

    def _policy_masks(self, per_token_logps, old, entropies, mask, inputs):
        """(entropy mask, policy mask): TRL's masks of the per-token policy loss, by TRL's own
        methods: the high-entropy mask of ``top_entropy_quantile`` (a gather across processes,
        as TRL) and the off-policy sequence mask of ``off_policy_mask_threshold`` (against the
        sampling log-probs when vLLM gave them, else the old ones); None where off."""
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        policy_mask = entropy_mask
        if self.off_policy_mask_threshold is not None:
            advantages = inputs["advantages"]
            advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            sampling = inputs.get("sampling_per_token_logps", old)
            opsm = self.get_off_policy_mask(advantages, per_token_logps, sampling, mask,
                                            self.off_policy_mask_threshold)
            policy_mask = opsm if policy_mask is None else policy_mask * opsm
        return entropy_mask, policy_mask

    def _entropy_bonus(self, entropies, mask, mode, acc):
        """TRL's entropy bonus c·H̄/acc, H̄ = Σ m·H / max(Σ m, 1) the micro-batch's mean token entropy,
        with TRL's coefficient c: ``entropy_coef``, or with ``use_adaptive_entropy`` the coefficient
        of the last optimizer step, applied while the world's entropy was at most ``entropy_target``
        and moved by ``entropy_coef_delta`` at each optimizer step (one host read there, as TRL)."""
        m = mask.to(entropies.dtype)
        stats = torch.stack([(entropies * m).sum(), m.sum()])
        a = self.args
        coef = self.entropy_coef
        if self.use_adaptive_entropy:
            coef = coef if self._last_world_entropy <= a.entropy_target else 0.0
            if mode == "train":
                window = self._entropy_window_stats
                self._entropy_window_stats = stats.detach() if window is None else window + stats.detach()
                if self.accelerator.sync_gradients:
                    total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    world = (total[0] / total[1].clamp(min=1.0)).item()
                    if world <= a.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                    self._last_world_entropy = world
                    self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef * (stats[0] / stats[1].clamp(min=1.0) / acc)

    def _log_irt_metrics(self, mode, entropies, mask, metrics, per_process):
        """TRL's metrics (``entropy``, the clip ratios of :data:`TRL_METRICS`, the means over
        processes of ``per_process``) and ours as ``irt/<name>``, in one reduce and one host read."""
        m = mask.to(entropies.dtype)
        trl = {} if self.importance_sampling_level != "token" else TRL_METRICS.get(self.irt_loss_type, {})
        n = metrics["token_count"].detach().to(entropies.dtype)
        values = {**{f"irt/{k}": v for k, v in metrics.items()}, **per_process}
        local = torch.stack([(entropies.detach() * m).sum(), m.sum()]
                            + [v.detach().to(entropies.dtype) for v in values.values()]
                            + [n * sum(metrics[k] for k in ours) for ours in trl.values()])
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        self._metrics[mode]["entropy"].append(total[0] / max(total[1], 1.0))
        for name, value in zip(values, total[2:]):
            self._metrics[mode][name].append(value / self.accelerator.num_processes)
        count = total[2 + list(values).index("irt/token_count")]  # TRL's means are over all processes' tokens
        for name, value in zip(trl, total[2 + len(values):]):
            self._metrics[mode][name].append(value / max(count, 1.0))
