"""The options of a call (SPEC §2-5), checked (SPEC §11): the family's parameters
(``make_params``: the dataclass of ``loss_type``'s module in ``families/``), the
aggregation (``AggConfig``), the KL term (``KLConfig``), the rollout correction
(``RolloutCorrection``). ``LOSS_TYPES`` (derived from
the family modules) and ``AGG_MODES`` are the public name lists; number and name
checks are ``options.py``'s.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .families import FAMILIES, kernel_family
from .options import FP32_MAX, Options, check_choice, real_in, set_real, shown, unknown_option

LOSS_TYPES = tuple(FAMILIES)
AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
# keyword options of policy_loss that are not family parameters
CALL_OPTIONS = ("loss_agg_mode", "dp_size", "global_token_count", "global_batch_size",
                "loss_scale_factor", "log_ratio_clamp", "process_group", "cu_seqlens", "validate",
                "rollout_is_weights", "ref_log_prob", "kl_coef", "kl_type", "kl_correction",
                "rollout_log_prob", "rollout_correction")
# verl's kl_penalty names (SPEC §4.1) → the kernels' KL_TYPE (kernels/kl.py); "+": verl's
# straight-through k2 gradient (KL_STRAIGHT_THROUGH; "k2+" is k2 itself)
KL_TYPES = {"kl": 1, "k1": 1, "abs": 2, "mse": 3, "k2": 3, "low_var_kl": 4, "k3": 4,
            "kl+": 9, "k1+": 9, "abs+": 10, "mse+": 3, "k2+": 3, "low_var_kl+": 12, "k3+": 12}
# how the KL term is corrected for off-policy tokens (kernels/kl.py: KL_RATIO, KL_UNBIASED):
# "ratio", TRL's use_bias_correction_kl (k·w); "unbiased", OpenRLHF's unbiased_gradient
KL_CORRECTIONS = (None, "ratio", "unbiased")
_KL_NAMES = {code: name for name, code in reversed(KL_TYPES.items())}  # a type code's first name

PARAMS_BY_LOSS_TYPE = {name: family.params for name, family in FAMILIES.items()}


# ----------------------------------------------------------------------------- aggregation
def _check_count(name: str, value):
    """A count: None, a real number >= 0 (returned as float), or a 0-dim float/int tensor
    (SPEC §2: may live on the op's device; its value is never read, so no sync)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a floating or integer tensor, got {value.dtype}")
        return value
    return real_in(name, value, lo=0.0)


@dataclass(frozen=True)
class AggConfig(Options):
    """verl ``agg_loss`` options (SPEC §5). ``None`` means: derive from the local batch.

    ``global_token_count`` / ``global_batch_size`` may also be 0-dim tensors (on the
    op's device, see :meth:`check_device`); numbers are stored as Python floats."""

    loss_agg_mode: str = "token-mean"
    dp_size: int = 1
    global_token_count: Optional[float] = None
    global_batch_size: Optional[float] = None
    loss_scale_factor: Optional[float] = None

    def __post_init__(self):
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        dp = self.dp_size
        if isinstance(dp, bool) or not isinstance(dp, numbers.Real):
            raise TypeError(f"dp_size must be an int >= 1, got {type(dp).__name__} {dp!r}")
        if not isinstance(dp, numbers.Integral) or dp < 1 or dp > FP32_MAX:
            raise ValueError(f"dp_size must be an int >= 1, got {dp!r}")
        object.__setattr__(self, "dp_size", int(dp))
        for name in ("global_token_count", "global_batch_size"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name)))
        set_real(self, "loss_scale_factor", optional=True, lo=0.0)

    def check_device(self, device) -> None:
        """Tensor counts must live on ``device`` (reading them elsewhere would copy and sync)."""
        for name in ("global_token_count", "global_batch_size"):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor) and v.device != device:
                raise ValueError(f"{name} is on {v.device} but log_prob is on {device}")


# ----------------------------------------------------------------------------- entry points
def check_loss_type(loss_type) -> None:
    check_choice("loss_type", loss_type, LOSS_TYPES)


def check_loss_agg_mode(loss_agg_mode) -> None:
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)


def check_log_ratio_clamp(value) -> float:
    """C of ℓ = clamp(d, −C, C) as a Python float (a real number > 0, fp32-representable)."""
    return real_in("log_ratio_clamp", value, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class KLConfig:
    """β·agg(k_t) added to the loss (SPEC §4.1): ``kl_coef`` β, verl's ``kl_type`` name and
    the off-policy ``kl_correction`` (None, ``"ratio"``: k·w as TRL's use_bias_correction_kl,
    ``"unbiased"``: the value k with the gradient min(w, 10)·x, OpenRLHF's unbiased_gradient)."""

    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    kl_correction: Optional[str] = None

    def __post_init__(self):
        set_real(self, "kl_coef", lo=0.0)
        check_choice("kl_type", self.kl_type, KL_TYPES)
        if self.kl_correction not in KL_CORRECTIONS:
            raise ValueError(f"kl_correction must be one of {KL_CORRECTIONS}, got {self.kl_correction!r}")
        if self.kl_correction is not None and self.kl_type.endswith("+"):
            raise ValueError(f"kl_type={self.kl_type!r} sets the KL gradient itself: it takes no "
                             f"kl_correction, got {self.kl_correction!r}")

    @property
    def code(self) -> int:
        """The kernels' KL_TYPE: the type (bits 0-3), then 16·(the correction's index)."""
        return KL_TYPES[self.kl_type] + 16 * KL_CORRECTIONS.index(self.kl_correction)

    @classmethod
    def from_code(cls, kl_coef: float, code: int) -> "KLConfig":
        """The config whose :attr:`code` is ``code`` (the type by its first name)."""
        return cls(kl_coef, _KL_NAMES[code % 16], KL_CORRECTIONS[code // 16])


def kl_config(kl_coef, kl_type, ref_log_prob, kl_correction=None) -> KLConfig:
    """The KL term's options (SPEC §4.1) checked against ``ref_log_prob``: a nonzero ``kl_coef``
    needs ``ref_log_prob`` and ``ref_log_prob`` needs ``kl_coef`` (neither is ignored silently).
    ``kl_coef=None`` means not given; an explicit ``kl_coef=0.0`` with ``ref_log_prob`` is
    allowed (the ``kl_loss`` metric without a penalty, e.g. a β schedule that reaches 0)."""
    kl = KLConfig(0.0 if kl_coef is None else kl_coef, kl_type, kl_correction)
    if ref_log_prob is None and kl.kl_coef != 0:
        raise ValueError(f"kl_coef={shown(kl_coef)!r} is given without ref_log_prob: pass ref_log_prob "
                         f"(the reference policy's log-probs of the KL term) or leave kl_coef out")
    if ref_log_prob is not None and kl_coef is None:
        raise ValueError("ref_log_prob is given without kl_coef: pass kl_coef (the KL term's weight; "
                         "kl_coef=0.0 reports the kl_loss metric only) or leave ref_log_prob out")
    return kl


def check_process_group(process_group, name: str = "process_group") -> None:
    """``process_group`` (the argument ``name``) must be None or a ``torch.distributed.ProcessGroup``."""
    if process_group is None:
        return
    dist = torch.distributed
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"{name} must be None or a torch.distributed.ProcessGroup, "
                        f"got {type(process_group).__name__} {process_group!r}")


def make_params(loss_type: str, params=None, **kwargs):
    """The family dataclass for ``loss_type`` from a ``params=`` instance (optionally
    updated by keyword arguments) or from keyword arguments alone."""
    check_loss_type(loss_type)
    cls = FAMILIES[loss_type].params
    names = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in names:
            raise unknown_option(key, names, f"loss_type={loss_type!r}", CALL_OPTIONS + ("params",))
    if params is not None:
        if not isinstance(params, cls):
            raise TypeError(f"params must be a {cls.__name__} for loss_type={loss_type!r}, "
                            f"got {type(params).__name__}")
        return dataclasses.replace(params, **kwargs) if kwargs else params
    return cls(**kwargs)


# ----------------------------------------------------------------------------- rollout correction
ROLLOUT_WEIGHTS = ("truncate", "mask", None)  # kernels/rows.py: CORRECTION bits 0-1 = index + 1
ROLLOUT_REJECTS = (None, "k1", "k2", "k3")  # bits 2-3
ROLLOUT_RATIOS = ("old", "current")  # bit 4
ROLLOUT_LEVELS = ("token", "sequence")  # the weight's level: bit 5
REJECT_LEVELS = ("token", "sequence_sum", "sequence_mean", "sequence_max")  # bits 6-7


@dataclass(frozen=True)
class RolloutCorrection(Options):
    """The train/rollout mismatch correction computed from ``rollout_log_prob``.

    x = log π_old − log π_rollout per token (``ratio_of="old"``; ``"current"``: log π −
    log π_rollout, detached, verl's bypass mode where old_log_prob is the rollout's). The ratio is
    ρ = e^{clamp(x)} per token (``level="token"``), or per row ρ_b = e^{clamp(Σ_t x_t)} over the
    row's tokens counted before any rejection (``level="sequence"``: TRL's and verl's sequence IS),
    the clamp at ±``log_ratio_clamp``. The rollout IS weight r multiplies each token's policy term:

    - ``weight="truncate"``: r = clamp(ρ, weight_min, weight_max) (TIS; TRL's ``*_truncate``);
    - ``weight="mask"``: r = ρ where weight_min ≤ ρ ≤ weight_max, else 0 (IcePop, TRL's ``*_mask``);
    - ``weight=None``: r = 1.

    ``reject`` (verl's ``rollout_rs``) takes tokens out of the count mask, normalizers included.
    ``reject_level="token"``: a token unless ``"k1"``: reject_min ≤ ρ ≤ reject_max (compared as
    log bounds on x); ``"k2"``: ½x² ≤ reject_max; ``"k3"``: eˣ − 1 − x ≤ reject_max.
    ``"sequence_sum"`` / ``"sequence_mean"`` / ``"sequence_max"``: every token of a row whose sum,
    mean or max (k2, k3) of the token statistics (k1: x) breaks the same bounds. x is clamped to
    ±``log_ratio_clamp`` in the statistics. A bound left None is open.
    """

    weight: Optional[str] = "truncate"
    weight_min: Optional[float] = None
    weight_max: Optional[float] = 2.0
    reject: Optional[str] = None
    reject_min: Optional[float] = None
    reject_max: Optional[float] = None
    ratio_of: str = "old"
    level: str = "token"
    reject_level: str = "token"

    def __post_init__(self):
        if self.weight not in ROLLOUT_WEIGHTS:
            raise ValueError(f"weight must be one of {ROLLOUT_WEIGHTS}, got {self.weight!r}")
        if self.reject not in ROLLOUT_REJECTS:
            raise ValueError(f"reject must be one of {ROLLOUT_REJECTS}, got {self.reject!r}")
        check_choice("ratio_of", self.ratio_of, ROLLOUT_RATIOS)
        check_choice("level", self.level, ROLLOUT_LEVELS)
        check_choice("reject_level", self.reject_level, REJECT_LEVELS)
        if self.reject_level == "sequence_max" and self.reject == "k1":
            raise ValueError("reject_level='sequence_max' bounds a divergence (k2, k3), not the ratio (k1)")
        if self.reject_level != "token" and self.reject is None:
            raise ValueError(f"reject_level={self.reject_level!r} is given without reject: set reject to 'k1', "
                             f"'k2' or 'k3'")
        for name in ("weight_min", "weight_max", "reject_min", "reject_max"):
            set_real(self, name, optional=True, lo=0.0, lo_open=True)
        for lo, hi in (("weight_min", "weight_max"), ("reject_min", "reject_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) must not exceed {hi} ({b})")
        if self.reject is None and (self.reject_min is not None or self.reject_max is not None):
            raise ValueError("reject_min / reject_max are given without reject: set reject to 'k1', 'k2' or 'k3'")
        if self.reject in ("k2", "k3"):
            if self.reject_min is not None:
                raise ValueError(f"reject={self.reject!r} bounds a divergence from above only: reject_min must be "
                                 f"None, got {self.reject_min!r}")
            if self.reject_max is None:
                raise ValueError(f"reject={self.reject!r} needs reject_max (the largest divergence kept)")
        if self.reject == "k1" and self.reject_min is None and self.reject_max is None:
            raise ValueError("reject='k1' needs reject_min or reject_max (the bounds of the ratio kept)")

    @property
    def code(self) -> int:
        """The kernels' CORRECTION (``kernels/rows.py``): weight, rejection, ratio and level bits; never 0."""
        return (ROLLOUT_WEIGHTS.index(self.weight) + 1 + 4 * ROLLOUT_REJECTS.index(self.reject)
                + 16 * ROLLOUT_RATIOS.index(self.ratio_of) + 32 * ROLLOUT_LEVELS.index(self.level)
                + 64 * REJECT_LEVELS.index(self.reject_level))

    @property
    def per_row(self) -> bool:
        """A row quantity (the sequence ratio, a sequence rejection): pass 1 sums it per row."""
        return self.level == "sequence" or self.reject_level != "token"

    @property
    def floats(self) -> tuple:
        """The kernels' runtime floats: (weight_min, weight_max, the low bound of the
        ``rollout_is_fraction_low`` metric (weight_min, else 1/weight_max as verl), the bounds of x
        kept: log reject_min, log reject_max for k1, reject_max for k2 and k3); open bounds ±inf."""
        lo = 0.0 if self.weight_min is None else self.weight_min
        hi = math.inf if self.weight_max is None else self.weight_max
        low_metric = self.weight_min if self.weight_min is not None else (
            0.0 if self.weight_max is None else 1.0 / self.weight_max)
        if self.reject == "k1":
            x_lo = -math.inf if self.reject_min is None else math.log(self.reject_min)
            x_hi = math.inf if self.reject_max is None else math.log(self.reject_max)
        else:
            x_lo, x_hi = -math.inf, (math.inf if self.reject_max is None else self.reject_max)
        return (lo, hi, low_metric, x_lo, x_hi)


NO_CORRECTION = (0, (0.0, 0.0, 0.0, 0.0, 0.0))  # the kernels' (CORRECTION, floats) without a correction


def check_correction_family(correction: Optional[RolloutCorrection], loss_type: str, params) -> None:
    """The combinations the op does not compute: a sequence-level rejection with a γ rule of
    batch statistics (they would need the rows' rejection before the batch pass), a rejection with
    a token selection (kl_cov, clip_cov: its pass counts every token), and a sequence weight with
    a family whose row weight takes the rollout weights per token (VESPO)."""
    if correction is None:
        return
    fam = kernel_family(loss_type, params)
    if correction.reject_level != "token" and (fam.needs_stats or fam.given) and not fam.per_row:
        gamma = getattr(params, "gamma", None)
        raise NotImplementedError(
            f"reject_level={correction.reject_level!r} with {loss_type}'s batch statistics"
            + (f" (gamma={gamma!r}) is not computed: use reject_level='token', a fixed gamma or "
               f"gamma_granularity='sequence'" if gamma is not None else " is not computed: use reject_level='token'"))
    if correction.reject is not None and fam.select_ratio:
        raise NotImplementedError(f"a rollout rejection with {loss_type}'s token selection is not computed: use "
                                  f"reject=None (the rollout IS weights apply)")
    if correction.level == "sequence" and fam.rollout_in_row:
        raise NotImplementedError(f"level='sequence' with {loss_type}, whose row weight takes the rollout weights "
                                  f"per token, is not computed: use level='token'")


def correction_args(correction: Optional[RolloutCorrection]) -> tuple:
    """The kernels' (CORRECTION, floats) of a correction (:data:`NO_CORRECTION` for None)."""
    return NO_CORRECTION if correction is None else (correction.code, correction.floats)


def rollout_config(rollout_is_weights, rollout_log_prob, rollout_correction) -> Optional[RolloutCorrection]:
    """The rollout correction of a call (None: none, or weights given as ``rollout_is_weights``):
    ``rollout_log_prob`` and ``rollout_is_weights`` exclude each other, and a correction needs
    ``rollout_log_prob`` (a dict or a :class:`RolloutCorrection`; default: TIS at 2)."""
    if rollout_log_prob is None:
        if rollout_correction is not None:
            raise ValueError("rollout_correction is given without rollout_log_prob: pass rollout_log_prob "
                             "(the rollout policy's log-probs) or leave rollout_correction out")
        return None
    if rollout_is_weights is not None:
        raise ValueError("rollout_is_weights and rollout_log_prob are both given: pass the weights, or the "
                         "rollout log-probs with rollout_correction to compute them in the op, not both")
    if rollout_correction is None:
        return RolloutCorrection()
    if isinstance(rollout_correction, dict):
        return RolloutCorrection(**rollout_correction)
    if not isinstance(rollout_correction, RolloutCorrection):
        raise TypeError(f"rollout_correction must be a RolloutCorrection or a dict of its fields, got "
                        f"{type(rollout_correction).__name__}")
    return rollout_correction
