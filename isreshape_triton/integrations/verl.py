"""verl adapter (verl 0.9): every family as a verl policy loss.

Importing this module registers, with verl's ``register_policy_loss``, one loss
function per family under the names of :data:`VERL_NAMES` (none collides with
verl's own: vanilla, dppo_tv, dppo_kl, gspo, sapo, gpg, clip_cov, kl_cov,
geo_mean, dro, cispo, bypass_mode). An installed isreshape-triton declares this
module as a ``verl.plugins`` entry point, so ``import verl`` registers them in
every worker (verl's default ``VERL_USE_EXTERNAL_PLUGINS=auto``); the switch is
then one line of the actor config::

    actor_rollout_ref.actor.policy_loss.loss_mode=is_reshape

Options come from the actor config verl passes as ``config``:

- ``policy_loss.irt``: a mapping of family parameters (``{gamma: ess, rho_min: 0.3}``),
  validated by :func:`isreshape_triton.make_params`. verl builds ``policy_loss`` from
  its ``_target_`` dataclass, which has no such field: point ``_target_`` at
  :class:`IRTPolicyLossConfig` (the same dataclass plus ``irt``) to set it.
- ``ppo_clip_irt``: ``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high`` (``None``:
  ``clip_ratio``) and ``clip_ratio_c`` (dual clip), as verl's ``vanilla``.
- ``sapo_irt``: ``tau_pos`` / ``tau_neg``.
- ``global_batch_info``: ``dp_size``, ``batch_num_tokens`` (our ``global_token_count``),
  ``global_batch_size``, ``loss_scale_factor``, as verl's ``agg_loss``; counts may be
  0-dim tensors.

The ``loss_agg_mode`` argument selects the aggregation for every family (verl's own
``sapo`` always uses seq-mean-token-mean; set ``loss_agg_mode`` for ``sapo_irt``).
``rollout_is_weights`` is passed through (token-level families scale φ and F by it,
VESPO folds it into W). The KL-to-reference term stays verl's (``use_kl_loss``).

Returns ``(loss, metrics)`` like verl's loss functions: ``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (0 for families without clipping) and
every metric of the op under ``actor/irt/<name>``, as Python floats read with a
single device-to-host copy (verl's own functions call ``.item()`` per metric).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config import PolicyLossConfig

from .. import api

#: our loss_type → the name registered with verl
VERL_NAMES = {
    "is_reshape": "is_reshape",
    "is_reshape_sign": "is_reshape_sign",
    "is_reshape_tr": "is_reshape_tr",
    "is_reshape_var": "is_reshape_var",
    "ppo_clip": "ppo_clip_irt",
    "sapo": "sapo_irt",
    "vespo": "vespo_irt",
}
#: verl's metric name for our metric (0 where the family has none)
VERL_METRICS = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "ppo_kl",
                "actor/pg_clipfrac_lower": "clipfrac_lower"}


@dataclass
class IRTPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus ``irt``: the family parameters of our losses."""

    irt: dict = field(default_factory=dict)


def _section(config, key):
    value = config.get(key, None) if config is not None else None
    return {} if value is None else value


def family_params(loss_type: str, config) -> dict:
    """Family parameters of ``loss_type`` read from verl's actor ``config``."""
    params = {}
    if loss_type == "ppo_clip":
        eps = config.get("clip_ratio", 0.2)
        low, high = config.get("clip_ratio_low", None), config.get("clip_ratio_high", None)
        params = {"clip_ratio_low": eps if low is None else low,
                  "clip_ratio_high": eps if high is None else high,
                  "clip_ratio_c": config.get("clip_ratio_c", 3.0)}
    elif loss_type == "sapo":
        params = {"tau_pos": config.get("tau_pos", 1.0), "tau_neg": config.get("tau_neg", 1.05)}
    irt = _section(_section(config, "policy_loss"), "irt")
    params.update({str(k): v for k, v in dict(irt).items()})
    return params


def _count(name, value, device):
    """A count of ``global_batch_info`` for the op: a number, or a 0-dim tensor on ``device``."""
    if value is None or not isinstance(value, torch.Tensor):
        return value
    if value.numel() != 1:
        raise ValueError(f"global_batch_info[{name!r}] must hold one value, got shape {tuple(value.shape)}")
    return value.reshape(()).to(device, non_blocking=True)


def aggregation_options(config, device) -> dict:
    """``dp_size``, ``global_token_count``, ``global_batch_size``, ``loss_scale_factor``
    from ``config.global_batch_info`` (verl's ``agg_loss`` keywords)."""
    info = dict(_section(config, "global_batch_info"))
    dp = info.get("dp_size")
    options = {"dp_size": 1 if dp is None else int(dp),  # a host int in verl (a tensor: one read)
               "global_token_count": _count("batch_num_tokens", info.get("batch_num_tokens"), device),
               "global_batch_size": _count("global_batch_size", info.get("global_batch_size"), device),
               "loss_scale_factor": info.get("loss_scale_factor")}
    return {k: v for k, v in options.items() if v is not None}


def verl_metrics(metrics: dict) -> dict:
    """verl's metric names plus ours under ``actor/irt/``, as floats (one host copy)."""
    names = list(VERL_METRICS) + [f"actor/irt/{k}" for k in metrics]
    ref = next(iter(metrics.values()))
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    values = [metrics.get(k, zero) for k in VERL_METRICS.values()] + list(metrics.values())
    return dict(zip(names, torch.stack([v.detach().to(ref.dtype) for v in values]).tolist()))


def make_policy_loss_fn(loss_type: str):
    """verl's policy-loss signature around :func:`isreshape_triton.policy_loss`."""
    name = VERL_NAMES[loss_type]

    def policy_loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                       config=None, rollout_is_weights=None):
        if config is None:
            raise ValueError(f"policy loss {name!r} needs verl's actor config (config=None)")
        extra = {} if rollout_is_weights is None else {"rollout_is_weights": rollout_is_weights}
        loss, metrics = api.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_type,
                                        loss_agg_mode, **aggregation_options(config, log_prob.device),
                                        **family_params(loss_type, config), **extra)
        return loss, verl_metrics(metrics)

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"compute_policy_loss_{name}"
    policy_loss_fn.__doc__ = (f"verl policy loss {name!r}: isreshape_triton.policy_loss(loss_type="
                              f"{loss_type!r}) with the options of verl's actor config.")
    return policy_loss_fn


POLICY_LOSS_FNS = {name: register_policy_loss(name)(make_policy_loss_fn(loss_type))
                   for loss_type, name in VERL_NAMES.items()}
