"""Loss-family parameters (SPEC §3-4), the options every family shares, and their
validation (SPEC §11).

Each family has one frozen dataclass holding its parameters with the SPEC
defaults; ``make_params(loss_type, **kwargs)`` builds and validates it, and the
error names the offending argument. ``LOSS_TYPES`` and ``AGG_MODES`` are the
public name lists.

Numbers (SPEC §11, :func:`as_real`): a float parameter takes a real number
(``int``, ``float``, ``numpy`` int/float scalars, ...) and is stored as a Python
``float``; a ``bool`` is not a number (``TypeError``). It must be finite and
*representable in fp32*, the precision of the kernels' scalar arguments: 0, or
a magnitude in [2⁻¹⁴⁹, fp32 max] = [1.4e-45, 3.4e38], i.e. a value that
neither overflows to ±inf nor underflows to 0 when cast to fp32 (1e39 and 1e-50
are refused; subnormals such as 1e-44 are accepted and lose precision, a
GPU that flushes them to zero sees 0).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

LOSS_TYPES = (
    "is_reshape",
    "is_reshape_sign",
    "is_reshape_tr",
    "is_reshape_var",
    "ppo_clip",
    "sapo",
    "vespo",
)
AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
GAMMA_MODES = ("ess", "ess_exact", "psis")
GRANULARITIES = ("batch", "sequence")
NEG_SATURATIONS = ("none", "soft", "truncate", "michaelis_menten")
POS_WEIGHTS = ("power", "michaelis_menten")
# keyword options of policy_loss that are not family parameters
CALL_OPTIONS = ("loss_agg_mode", "dp_size", "global_token_count", "global_batch_size",
                "loss_scale_factor", "log_ratio_clamp", "process_group", "cu_seqlens", "validate",
                "rollout_is_weights", "ref_log_prob", "kl_coef", "kl_type")
# verl's kl_penalty names (SPEC §4.1) → the kernels' KL_TYPE (kernels/families.py)
KL_TYPES = {"kl": 1, "k1": 1, "abs": 2, "mse": 3, "k2": 3, "low_var_kl": 4, "k3": 4}

FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
FP32_TRUE_MIN = 2.0 ** -149  # smallest positive fp32 subnormal

GammaSpec = Union[str, float]


# ----------------------------------------------------------------------------- numbers
def as_number(v):
    """``v`` as a Python float; a symbolic float (``torch.SymFloat``: a float argument that
    torch.compile traces as a graph input) stays symbolic, so a new value does not recompile."""
    return v if isinstance(v, torch.SymFloat) else float(v)


def _shown(value):
    """``value`` for an error message: a symbolic float's traced example value."""
    return value.node.hint if isinstance(value, torch.SymFloat) else value


def as_real(name: str, value) -> float:
    """``value`` as a Python float: a real number (not a bool), finite, representable in fp32.
    A ``torch.SymFloat`` passes the same checks as comparisons (range guards, no value guard)."""
    if not isinstance(value, torch.SymFloat) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number (int, float or numpy scalar), "
                        f"got {type(value).__name__} {value!r}")
    v = as_number(value)
    if not (-math.inf < v < math.inf):  # NaN fails too
        raise ValueError(f"{name} must be finite, got {_shown(value)!r}")
    if abs(v) > FP32_MAX or (v != 0 and abs(v) < FP32_TRUE_MIN):
        raise ValueError(f"{name}={_shown(value)!r} is not representable in fp32: it must be 0 or have a "
                         f"magnitude in [{FP32_TRUE_MIN:.4g}, {FP32_MAX:.6g}]")
    return v


def _real_in(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """:func:`as_real` within the bounds (``None``: unbounded); the error states the range."""
    v = as_real(name, value)
    if ((lo is not None and (v < lo or (lo_open and v == lo)))
            or (hi is not None and (v > hi or (hi_open and v == hi)))):
        if hi is None:
            what = f"a finite number {'>' if lo_open else '>='} {lo}"
        elif lo is None:
            what = f"a finite number {'<' if hi_open else '<='} {hi}"
        else:
            what = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be {what}, got {_shown(value)!r}")
    return v


def _set_real(obj, name: str, optional: bool = False, **bounds) -> None:
    """Validate the field ``name`` of a frozen dataclass and store it as a Python float."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    object.__setattr__(obj, name, _real_in(name, value, **bounds))


def _did_you_mean(value, choices) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to a misspelt one, else ``""``."""
    near = difflib.get_close_matches(value, list(choices), n=1) if isinstance(value, str) else []
    return f" (did you mean {near[0]!r}?)" if near else ""


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}{_did_you_mean(value, choices)}")


def _unknown_option(key: str, valid, owner: str, shared=()) -> TypeError:
    hint = _did_you_mean(key, list(valid) + list(shared))
    also = f"; shared options: {list(shared)}" if shared else ""
    return TypeError(f"unknown option {key!r} for {owner}{hint}; valid options: {sorted(valid)}{also}")


class _Options:
    """Base of the option dataclasses: an unknown keyword is a clear TypeError that lists
    the valid names (also through ``dataclasses.replace``), not a raw ``__init__`` error."""

    def __new__(cls, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                raise _unknown_option(key, names, cls.__name__)
        return super().__new__(cls)


# ----------------------------------------------------------------------------- γ rules
def _set_gamma_spec(p) -> None:
    gamma = p.gamma
    if isinstance(gamma, str):
        _check_choice("gamma", gamma, GAMMA_MODES)
    elif isinstance(gamma, bool) or not isinstance(gamma, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"gamma must be one of {GAMMA_MODES} or a float, got {gamma!r}")
    else:
        _set_real(p, "gamma")


def _set_gamma_rule(p) -> None:
    """The γ-rule fields shared by is_reshape and is_reshape_var."""
    _set_gamma_spec(p)
    _set_real(p, "rho_min", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    _set_real(p, "gamma_min", lo=0.0)
    _set_real(p, "gamma_max", lo=0.0)
    if p.gamma_min > p.gamma_max:
        raise ValueError(f"gamma_min ({p.gamma_min}) must not exceed gamma_max ({p.gamma_max})")
    if not isinstance(p.gamma, str) and not p.gamma_min <= p.gamma <= p.gamma_max:  # range guards only
        raise ValueError(f"gamma={_shown(p.gamma)!r} is outside [gamma_min, gamma_max] = "
                         f"[{_shown(p.gamma_min)!r}, {_shown(p.gamma_max)!r}]: a fixed gamma must lie within "
                         f"its bounds (widen gamma_min/gamma_max to use it)")
    _check_choice("gamma_granularity", p.gamma_granularity, GRANULARITIES)
    if p.gamma in ("ess_exact", "psis") and p.gamma_max > 1.0:
        raise ValueError(f"gamma_max must be <= 1 with gamma={p.gamma!r}, got {p.gamma_max!r}")
    _set_real(p, "gamma_fallback", lo=0.0, hi=1.0)


# ----------------------------------------------------------------------------- families
@dataclass(frozen=True)
class IsReshapeParams(_Options):
    """φ = w^γ·A, F = A·expm1(γℓ)/γ; γ from the batch (or row) variance of ℓ."""

    gamma: GammaSpec = "ess"
    rho_min: float = 0.3
    gamma_min: float = 0.05
    gamma_max: float = 1.0
    gamma_granularity: str = "batch"
    gamma_fallback: float = 0.3  # γ when PSIS finds k̂ > 0.7

    def __post_init__(self):
        _set_gamma_rule(self)


@dataclass(frozen=True)
class IsReshapeSignParams(_Options):
    """Sign-dependent shapes: A>0 → w^{γ+}·A (or Michaelis-Menten), A<0 → b(w)·A."""

    gamma: str = "ess"  # rule for γ+ / γ− not fixed below: "ess", "ess_exact" or "psis"
    gamma_pos: Optional[float] = None  # fixed γ+ (else from σ²₊)
    gamma_neg: Optional[float] = None  # fixed γ− (else from σ²₋)
    rho_min: float = 0.3
    gamma_granularity: str = "batch"
    neg_saturation: str = "soft"
    pos_weight: str = "power"
    saturation_lambda: float = 1.0  # λ of the soft saturation
    saturation_w_th: float = 3.0  # w_th of the soft saturation
    truncate_max: float = 10.0  # M of the truncate saturation
    mm_tau: float = 1.0  # τ of Michaelis-Menten (1+τ)w/(τ+w)
    gamma_fallback: float = 0.3  # γ+ when PSIS finds k̂ > 0.7 (γ− falls back to 1 + gamma_fallback)

    def __post_init__(self):
        _set_real(self, "gamma_fallback", lo=0.0, hi=1.0)
        if not isinstance(self.gamma, str) or self.gamma not in GAMMA_MODES:
            raise ValueError(f"gamma must be one of {GAMMA_MODES} for is_reshape_sign "
                             f"(fix gamma_pos/gamma_neg instead), got {self.gamma!r}")
        _set_real(self, "rho_min", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _check_choice("gamma_granularity", self.gamma_granularity, GRANULARITIES)
        _check_choice("neg_saturation", self.neg_saturation, NEG_SATURATIONS)
        _check_choice("pos_weight", self.pos_weight, POS_WEIGHTS)
        _set_real(self, "gamma_pos", optional=True, lo=0.0)
        _set_real(self, "gamma_neg", optional=True, lo=0.0)
        for name in ("saturation_lambda", "saturation_w_th", "mm_tau"):
            _set_real(self, name, lo=0.0, lo_open=True)
        _set_real(self, "truncate_max", lo=1.0)


@dataclass(frozen=True)
class IsReshapeTRParams(_Options):
    """Soft trust region: γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c), sech² shape with τ_h."""

    tau_h: float = 1.0
    tau_c: float = 1.0
    gamma_base: float = 0.1
    gamma_max: float = 0.9

    def __post_init__(self):
        _set_real(self, "tau_h", lo=0.0, lo_open=True)
        _set_real(self, "tau_c", lo=0.0, lo_open=True)
        _set_real(self, "gamma_base", lo=0.0)
        _set_real(self, "gamma_max", lo=0.0)
        if self.gamma_base > self.gamma_max:
            raise ValueError(f"gamma_base ({self.gamma_base}) must not exceed gamma_max ({self.gamma_max})")


@dataclass(frozen=True)
class IsReshapeVarParams(_Options):
    """Variational γ*(w, A): γ_t = clip(γ_base·(p2+p3) + p4, 0, 1), γ_base from σ²."""

    gamma: GammaSpec = "ess"  # rule for γ_base
    rho_min: float = 0.3
    gamma_min: float = 0.0  # bounds of γ_base
    gamma_max: float = 1.0
    temperature: float = 5.0  # T of the soft case indicators σ(T·ℓ), σ(T·A)
    gamma_granularity: str = "batch"
    gamma_fallback: float = 0.3  # γ_base when PSIS finds k̂ > 0.7

    def __post_init__(self):
        _set_gamma_rule(self)
        _set_real(self, "temperature", lo=0.0, lo_open=True)


@dataclass(frozen=True)
class PPOClipParams(_Options):
    """max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)); dual clip −A·c for A<0."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0  # None disables the dual clip

    def __post_init__(self):
        _set_real(self, "clip_ratio_low", lo=0.0, hi=1.0, hi_open=True)
        _set_real(self, "clip_ratio_high", lo=0.0)
        _set_real(self, "clip_ratio_c", optional=True, lo=1.0, lo_open=True)


@dataclass(frozen=True)
class SAPOParams(_Options):
    """Soft gate: φ = A·w·sech²(τ(w−1)/2), τ = τ_pos if A>0 else τ_neg."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self):
        _set_real(self, "tau_pos", lo=0.0, lo_open=True)
        _set_real(self, "tau_neg", lo=0.0, lo_open=True)


@dataclass(frozen=True)
class VESPOParams(_Options):
    """Sequence weight φ(W) = W^k·exp(λ(1−W)), W = exp(clamp(Σ m·ℓ, ±C)) per row."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0

    def __post_init__(self):
        for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
            _set_real(self, name, lo=0.0)


PARAMS_BY_LOSS_TYPE = {
    "is_reshape": IsReshapeParams,
    "is_reshape_sign": IsReshapeSignParams,
    "is_reshape_tr": IsReshapeTRParams,
    "is_reshape_var": IsReshapeVarParams,
    "ppo_clip": PPOClipParams,
    "sapo": SAPOParams,
    "vespo": VESPOParams,
}


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
    return _real_in(name, value, lo=0.0)


@dataclass(frozen=True)
class AggConfig(_Options):
    """verl ``agg_loss`` options (SPEC §5). ``None`` means: derive from the local batch.

    ``global_token_count`` / ``global_batch_size`` may also be 0-dim tensors (on the
    op's device, see :meth:`check_device`); numbers are stored as Python floats."""

    loss_agg_mode: str = "token-mean"
    dp_size: int = 1
    global_token_count: Optional[float] = None
    global_batch_size: Optional[float] = None
    loss_scale_factor: Optional[float] = None

    def __post_init__(self):
        _check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        dp = self.dp_size
        if isinstance(dp, bool) or not isinstance(dp, numbers.Real):
            raise TypeError(f"dp_size must be an int >= 1, got {type(dp).__name__} {dp!r}")
        if not isinstance(dp, numbers.Integral) or dp < 1 or dp > FP32_MAX:
            raise ValueError(f"dp_size must be an int >= 1, got {dp!r}")
        object.__setattr__(self, "dp_size", int(dp))
        for name in ("global_token_count", "global_batch_size"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name)))
        _set_real(self, "loss_scale_factor", optional=True, lo=0.0)

    def check_device(self, device) -> None:
        """Tensor counts must live on ``device`` (reading them elsewhere would copy and sync)."""
        for name in ("global_token_count", "global_batch_size"):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor) and v.device != device:
                raise ValueError(f"{name} is on {v.device} but log_prob is on {device}")


# ----------------------------------------------------------------------------- entry points
def check_loss_type(loss_type) -> None:
    _check_choice("loss_type", loss_type, LOSS_TYPES)


def check_loss_agg_mode(loss_agg_mode) -> None:
    _check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)


def check_log_ratio_clamp(value) -> float:
    """C of ℓ = clamp(d, −C, C) as a Python float (a real number > 0, fp32-representable)."""
    return _real_in("log_ratio_clamp", value, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class KLConfig:
    """β·agg(k_t) added to the loss (SPEC §4.1): ``kl_coef`` β and verl's ``kl_type`` name."""

    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"

    def __post_init__(self):
        _set_real(self, "kl_coef", lo=0.0)
        _check_choice("kl_type", self.kl_type, KL_TYPES)

    @property
    def code(self) -> int:
        return KL_TYPES[self.kl_type]


def kl_config(kl_coef, kl_type, ref_log_prob) -> KLConfig:
    """The KL term's options (SPEC §4.1) checked against ``ref_log_prob``: a nonzero ``kl_coef``
    needs ``ref_log_prob`` and ``ref_log_prob`` needs ``kl_coef`` (neither is ignored silently).
    ``kl_coef=None`` means not given; an explicit ``kl_coef=0.0`` with ``ref_log_prob`` is
    allowed (the ``kl_loss`` metric without a penalty, e.g. a β schedule that reaches 0)."""
    kl = KLConfig(0.0 if kl_coef is None else kl_coef, kl_type)
    if ref_log_prob is None and kl.kl_coef != 0:
        raise ValueError(f"kl_coef={_shown(kl_coef)!r} is given without ref_log_prob: pass ref_log_prob "
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
    cls = PARAMS_BY_LOSS_TYPE[loss_type]
    names = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in names:
            raise _unknown_option(key, names, f"loss_type={loss_type!r}", CALL_OPTIONS + ("params",))
    if params is not None:
        if not isinstance(params, cls):
            raise TypeError(f"params must be a {cls.__name__} for loss_type={loss_type!r}, "
                            f"got {type(params).__name__}")
        return dataclasses.replace(params, **kwargs) if kwargs else params
    return cls(**kwargs)
