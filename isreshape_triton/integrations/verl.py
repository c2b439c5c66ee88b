"""verl adapter (verl 0.9): every verl loss mode the op computes, and every family, as a verl
policy loss.

Importing this module registers, with verl's ``register_policy_loss``:

- ``<mode>_irt`` for each of verl's modes in :data:`VERL_MODES` (``vanilla_irt``, ``sapo_irt``,
  ``gpg_irt``, ``cispo_irt``, ``gspo_irt``, ``geo_mean_irt``, ``dro_irt``, ``dppo_tv_irt``,
  ``dppo_kl_irt``, ``bypass_mode_irt``, whose rollout correction the op computes from
  old_log_prob as the rollout's log-probs, ``clip_cov_irt``, ``kl_cov_irt``): verl's loss,
  gradient and metrics from the op, reading the options verl's own mode reads (``clip_ratio``,
  ``clip_ratio_low`` / ``clip_ratio_high`` with ``clip_ratio`` as their default, ``clip_ratio_c``,
  ``tau_pos`` / ``tau_neg``, ``policy_loss.dro_beta``, ``policy_loss.clip_cov_*``,
  ``kl_cov_ratio``, ``ppo_kl_coef``). ``clip_cov_irt`` draws its tokens with a seeded hash
  (``families/clip_cov.py``), not verl's ``randperm``: the same count from the same candidates,
  another random choice where there are more candidates than it drops;
- our families under the names of :data:`VERL_NAMES` (``is_reshape``, ..., ``ppo_clip_irt``
  = ``vanilla_irt``, ``vespo_irt``).

None collides with verl's own names. An installed isreshape-triton declares this module as a
``verl.plugins`` entry point, so ``import verl`` registers them in every worker (verl's default
``VERL_USE_EXTERNAL_PLUGINS=auto``); the switch is then one line of the actor config::

    actor_rollout_ref.actor.policy_loss.loss_mode=cispo_irt

Options come from the actor config verl passes as ``config``; ``policy_loss.irt``, a mapping
of family parameters (``{gamma: ess, rho_min: 0.3}``) validated by
:func:`isreshape_triton.make_params`, sets or overrides them. verl builds ``policy_loss`` from
its ``_target_`` dataclass, which has no such field: point ``_target_`` at
:class:`IRTPolicyLossConfig` (the same dataclass plus ``irt``) to set it.
``global_batch_info`` gives ``dp_size``, ``batch_num_tokens`` (our ``global_token_count``),
``global_batch_size`` and ``loss_scale_factor``, as verl's ``agg_loss``; counts may be 0-dim
tensors.

The ``loss_agg_mode`` argument selects the aggregation, except where verl's own mode ignores it:
``sapo_irt`` always uses seq-mean-token-mean, as verl's ``sapo``, and ``geo_mean_irt`` the mean of
the rows' losses over the micro-batch (``global_batch_info`` aside), as verl's ``geo_mean``.
``rollout_is_weights`` is passed through (token-level families scale φ and F by it, VESPO
folds it into W). The KL-to-reference term stays verl's (``use_kl_loss``).

Returns ``(loss, metrics)`` like verl's loss functions: ``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (0 for families without them) and every metric
of the op under ``actor/irt/<name>``, as Python floats read with a single device-to-host copy
(verl's own functions call ``.item()`` per metric).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional

import torch
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config import PolicyLossConfig

from .. import api
from ..families.clip_cov import SEED_LIMIT
from ..params import RolloutCorrection


def _clip_ratios(config) -> tuple:
    """verl's (clip_ratio_low, clip_ratio_high), each defaulting to ``clip_ratio``."""
    eps = config.get("clip_ratio", 0.2)
    low, high = config.get("clip_ratio_low", None), config.get("clip_ratio_high", None)
    return (eps if low is None else low), (eps if high is None else high)


def _no_options(config) -> dict:
    return {}


def _vanilla(config) -> dict:
    low, high = _clip_ratios(config)
    return {"clip_ratio_low": low, "clip_ratio_high": high, "clip_ratio_c": config.get("clip_ratio_c", 3.0)}


def _sapo(config) -> dict:
    return {"tau_pos": config.get("tau_pos", 1.0), "tau_neg": config.get("tau_neg", 1.05)}


def _clip_pair(config) -> dict:
    """clip_ratio_low / clip_ratio_high (each defaulting to clip_ratio), for every mode that reads only these."""
    low, high = _clip_ratios(config)
    return {"clip_ratio_low": low, "clip_ratio_high": high}


def _dro(config) -> dict:
    beta = _section(config, "policy_loss").get("dro_beta", None)
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return {"beta": beta}


def _dppo(divergence):
    def options(config) -> dict:
        low, high = _clip_ratios(config)
        return {"divergence": divergence, "clip_divergence_low": low, "clip_divergence_high": high,
                "clip_ratio_c": config.get("clip_ratio_c", 20.0)}
    return options


def _cov_option(config, name):
    """``policy_loss.<name>`` of verl's actor config, verl's default where unset."""
    value = _section(config, "policy_loss").get(name, None)
    return PolicyLossConfig.__dataclass_fields__[name].default if value is None else value


def _clip_cov(config) -> dict:
    """verl's clip_cov options; the draw's seed from torch's CPU generator per call (verl draws its
    ``randperm`` from it), unless ``policy_loss.irt`` fixes it."""
    low, high = _clip_ratios(config)
    return {"clip_ratio_low": low, "clip_ratio_high": high,
            **{k: _cov_option(config, k) for k in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub")},
            "seed": int(torch.randint(SEED_LIMIT, (), device="cpu"))}


def _kl_cov(config) -> dict:
    return {k: _cov_option(config, k) for k in ("kl_cov_ratio", "ppo_kl_coef")}


#: verl's rollout_rs prefix → the op's reject_level
_RS_LEVELS = {"token_": "token", "seq_sum_": "sequence_sum", "seq_mean_": "sequence_mean", "seq_max_": "sequence_max"}


def _rollout_correction(config) -> RolloutCorrection:
    """verl's ``policy_loss.rollout_correction`` as the op's correction of π against π_rollout
    (bypass mode: old_log_prob is the rollout's). ``rollout_is`` "token" or "sequence": TIS at
    ``rollout_is_threshold``, or IcePop's mask for a "lower_upper" threshold, on the token or the
    sequence ratio; ``rollout_rs``: one of verl's options, ``*_k1`` with ratio bounds "lower_upper"
    (or upper and 1/upper: verl keeps log lower ≤ −x ≤ log upper, i.e. ρ in [1/upper, 1/lower]),
    ``*_k2`` / ``*_k3`` with an upper bound, at the token level or on a row's sum, mean or max."""
    rc = _section(_section(config, "policy_loss"), "rollout_correction")
    level, rs = rc.get("rollout_is", "sequence"), rc.get("rollout_rs", None)
    if rc.get("rollout_is_batch_normalize", False) or (rs is not None and "," in rs):
        raise NotImplementedError(
            f"bypass_mode_irt computes one rollout_rs option and no batch normalization in the op; got "
            f"rollout_rs={rs!r}, rollout_is_batch_normalize={rc.get('rollout_is_batch_normalize', False)!r}: use "
            f"verl's bypass_mode")
    if level not in (None, "token", "sequence"):
        raise ValueError(f"rollout_is must be None, 'token' or 'sequence', got {level!r}")
    weight = {"weight": None}
    if level is not None:
        lo, hi = _bounds(rc.get("rollout_is_threshold", 2.0))
        weight = {"weight": "truncate", "weight_max": hi} if lo is None else {
            "weight": "mask", "weight_min": lo, "weight_max": hi}
        weight["level"] = level
    reject = {}
    if rs is not None:
        prefix = next((p for p in _RS_LEVELS if rs.startswith(p)), None)
        if prefix is None or rs[len(prefix):] not in ("k1", "k2", "k3"):
            raise ValueError(f"unknown rollout_rs option {rs!r}")
        lo, hi = _bounds(rc.get("rollout_rs_threshold", None))
        reject = {"reject": rs[len(prefix):], "reject_level": _RS_LEVELS[prefix]}
        if reject["reject"] == "k1":
            reject.update(reject_min=1.0 / hi, reject_max=1.0 / (1.0 / hi if lo is None else lo))
        else:
            reject["reject_max"] = hi
    return RolloutCorrection(**weight, **reject, ratio_of="current")


def _bounds(spec) -> tuple:
    """(lower or None, upper) of verl's threshold: a number, or a "lower_upper" string."""
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling")
    if isinstance(spec, str) and "_" in spec:
        lo, hi = spec.split("_", 1)
        return float(lo), float(hi)
    return None, float(spec)


def _bypass(config) -> dict:
    """verl's bypass mode (old_log_prob is the rollout's): its ``rollout_correction.loss_type``
    "ppo_clip" (vanilla's options; IS weights not applied, the rejection is) or "reinforce"
    (−A·log π·r: gpg with the weights)."""
    correction = _rollout_correction(config)
    rc = _section(_section(config, "policy_loss"), "rollout_correction")
    if rc.get("loss_type", "ppo_clip") == "reinforce":
        return {"loss_type": "gpg", "rollout_correction": correction}
    return {"loss_type": "ppo_clip", **_vanilla(config),
            "rollout_correction": replace(correction, weight=None, level="token")}  # no weight: no ratio to sum


class Mode(NamedTuple):
    """A registered loss: our ``loss_type``, the family parameters it reads from verl's actor
    config, the aggregation verl's mode always uses (None: the ``loss_agg_mode`` argument) and
    whether that is a mean over the micro-batch's rows whatever ``global_batch_info`` says;
    ``bypass``: verl's bypass mode, whose options name the family (``loss_type``) and correct
    against old_log_prob as the rollout's log-probs; ``metrics``: verl's metric names this mode
    reports differently (over :data:`VERL_METRICS`)."""

    loss_type: str
    options: Callable = _no_options
    loss_agg_mode: Optional[str] = None
    local_rows: bool = False
    bypass: bool = False
    metrics: dict = {}


#: verl's loss mode → how the op computes it; each is registered as ``<mode>_irt``
VERL_MODES = {
    "vanilla": Mode("ppo_clip", _vanilla),
    "sapo": Mode("sapo", _sapo, "seq-mean-token-mean"),
    "gpg": Mode("gpg"),
    "cispo": Mode("cispo", _clip_pair),
    "gspo": Mode("gspo", _clip_pair),
    "geo_mean": Mode("gmpo", _clip_pair, "seq-mean-token-mean", local_rows=True),  # verl: torch.mean over rows
    "dro": Mode("dro", _dro),
    "dppo_tv": Mode("dppo", _dppo("tv")),
    "dppo_kl": Mode("dppo", _dppo("kl")),
    "bypass_mode": Mode("ppo_clip", _bypass, bypass=True),
    "clip_cov": Mode("clip_cov", _clip_cov, metrics={"actor/pg_clipfrac": "cov_selected"}),
    "kl_cov": Mode("kl_cov", _kl_cov, metrics={"actor/ppo_kl": "kl_abs"}),
}
#: our families that verl lacks, by the name registered with verl (and ppo_clip_irt = vanilla_irt)
VERL_NAMES = {
    "is_reshape": "is_reshape",
    "is_reshape_sign": "is_reshape_sign",
    "is_reshape_tr": "is_reshape_tr",
    "is_reshape_var": "is_reshape_var",
    "ppo_clip": "ppo_clip_irt",
    "vespo": "vespo_irt",
}
_OPTIONS = {"ppo_clip": _vanilla, "sapo": _sapo}  # the options of our families verl also configures
#: every registered name → its Mode
REGISTERED = {**{f"{mode}_irt": entry for mode, entry in VERL_MODES.items()},
              **{name: Mode(lt, _OPTIONS.get(lt, _no_options)) for lt, name in VERL_NAMES.items()}}
#: verl's metric name for our metric (0 where the family has none)
VERL_METRICS = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "ppo_kl",
                "actor/pg_clipfrac_lower": "clipfrac_lower"}
#: verl's rollout-correction metric name for our metric (the definitions agree)
VERL_ROLLOUT_METRICS = {"rollout_corr/rollout_is_mean": "rollout_is_mean",
                        "rollout_corr/rollout_is_ratio_fraction_high": "rollout_is_fraction_high",
                        "rollout_corr/rollout_is_ratio_fraction_low": "rollout_is_fraction_low",
                        "rollout_corr/rollout_rs_masked_fraction": "rollout_rs_masked_fraction",
                        "rollout_corr/kl": "rollout_kl"}


@dataclass
class IRTPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus ``irt``: the family parameters of our losses."""

    irt: dict = field(default_factory=dict)


def _section(config, key):
    value = config.get(key, None) if config is not None else None
    return {} if value is None else value


def family_params(name: str, config) -> dict:
    """Family parameters of the registered loss ``name`` read from verl's actor ``config``:
    the options its verl mode reads, then ``policy_loss.irt``."""
    params = REGISTERED[name].options(config)
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


def verl_metrics(metrics: dict, applied: Optional[RolloutCorrection] = None, names: Optional[dict] = None) -> dict:
    """verl's metric names plus ours under ``actor/irt/``, as floats (one host copy); ``names``:
    a mode's own sources of verl's names (over :data:`VERL_METRICS`); with a rollout correction
    also verl's ``rollout_corr/`` names of the metrics we share (the IS weight's only where it is
    applied)."""
    sources = {**VERL_METRICS, **(names or {})}
    names = list(sources) + [f"actor/irt/{k}" for k in metrics]
    ref = next(iter(metrics.values()))
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    values = [metrics.get(k, zero) for k in sources.values()] + list(metrics.values())
    if applied is not None:
        shared = {k: v for k, v in VERL_ROLLOUT_METRICS.items()
                  if applied.weight is not None or not k.startswith("rollout_corr/rollout_is")}
        shared = {k: v for k, v in shared.items() if applied.reject is not None or "_rs_" not in k}
        names += list(shared)
        values += [metrics[v] for v in shared.values()]
    return dict(zip(names, torch.stack([v.detach().to(ref.dtype) for v in values]).tolist()))


def make_policy_loss_fn(name: str):
    """verl's policy-loss signature around :func:`isreshape_triton.policy_loss` for the
    registered loss ``name``."""
    mode = REGISTERED[name]

    def policy_loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                       config=None, rollout_is_weights=None):
        if config is None:
            raise ValueError(f"policy loss {name!r} needs verl's actor config (config=None)")
        extra = {} if rollout_is_weights is None else {"rollout_is_weights": rollout_is_weights}
        agg = ({"global_batch_size": log_prob.shape[0]} if mode.local_rows
               else aggregation_options(config, log_prob.device))
        params = family_params(name, config)
        loss_type = params.pop("loss_type", mode.loss_type)
        if mode.bypass:  # verl ignores the given weights: the op computes them from old_log_prob
            extra = {"rollout_log_prob": old_log_prob}
        loss, metrics = api.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_type,
                                        mode.loss_agg_mode or loss_agg_mode, **agg, **params, **extra)
        return loss, verl_metrics(metrics, applied=params.get("rollout_correction"), names=mode.metrics)

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"compute_policy_loss_{name}"
    policy_loss_fn.__doc__ = (f"verl policy loss {name!r}: isreshape_triton.policy_loss(loss_type="
                              f"{mode.loss_type!r}) with the options of verl's actor config.")
    return policy_loss_fn


POLICY_LOSS_FNS = {name: register_policy_loss(name)(make_policy_loss_fn(name)) for name in REGISTERED}
