"""Loss-family parameters (SPEC §3-4) and the options every family shares.

Each family has one frozen dataclass holding its parameters with the SPEC
defaults; ``make_params(loss_type, **kwargs)`` builds and validates it, and the
error names the offending argument. ``LOSS_TYPES`` and ``AGG_MODES`` are the
public name lists.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

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

GammaSpec = Union[str, float]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_rho(rho_min: float) -> None:
    if not (isinstance(rho_min, (int, float)) and 0.0 < rho_min < 1.0):
        raise ValueError(f"rho_min must lie in (0, 1), got {rho_min!r}")


def _check_gamma_spec(gamma: GammaSpec) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (str, int, float)):
        raise TypeError(f"gamma must be one of {GAMMA_MODES} or a float, got {gamma!r}")
    if isinstance(gamma, str) and gamma not in GAMMA_MODES:
        raise ValueError(f"gamma must be one of {GAMMA_MODES} or a float, got {gamma!r}")
    if not isinstance(gamma, str) and not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")


def _check_exact_range(gamma, gamma_max) -> None:
    if gamma in ("ess_exact", "psis") and gamma_max > 1.0:
        raise ValueError(f"gamma_max must be <= 1 with gamma={gamma!r}, got {gamma_max!r}")


def _check_fallback(value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"gamma_fallback must lie in [0, 1], got {value!r}")


def _check_gamma_rule(p) -> None:
    """The γ-rule fields shared by is_reshape and is_reshape_var."""
    _check_gamma_spec(p.gamma)
    _check_rho(p.rho_min)
    _check_bounds("gamma_min", p.gamma_min, "gamma_max", p.gamma_max)
    _check_choice("gamma_granularity", p.gamma_granularity, GRANULARITIES)
    _check_exact_range(p.gamma, p.gamma_max)
    _check_fallback(p.gamma_fallback)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_bounds(lo_name: str, lo: float, hi_name: str, hi: float) -> None:
    for n, v in ((lo_name, lo), (hi_name, hi)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{n} must be a finite number >= 0, got {v!r}")
    if lo > hi:
        raise ValueError(f"{lo_name} ({lo}) must not exceed {hi_name} ({hi})")


@dataclass(frozen=True)
class IsReshapeParams:
    """φ = w^γ·A, F = A·expm1(γℓ)/γ; γ from the batch (or row) variance of ℓ."""

    gamma: GammaSpec = "ess"
    rho_min: float = 0.3
    gamma_min: float = 0.05
    gamma_max: float = 1.0
    gamma_granularity: str = "batch"
    gamma_fallback: float = 0.3  # γ when PSIS finds k̂ > 0.7

    def __post_init__(self):
        _check_gamma_rule(self)


@dataclass(frozen=True)
class IsReshapeSignParams:
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
        _check_fallback(self.gamma_fallback)
        if self.gamma not in GAMMA_MODES:
            raise ValueError(f"gamma must be one of {GAMMA_MODES} for is_reshape_sign "
                             f"(fix gamma_pos/gamma_neg instead), got {self.gamma!r}")
        _check_rho(self.rho_min)
        _check_choice("gamma_granularity", self.gamma_granularity, GRANULARITIES)
        _check_choice("neg_saturation", self.neg_saturation, NEG_SATURATIONS)
        _check_choice("pos_weight", self.pos_weight, POS_WEIGHTS)
        for name in ("gamma_pos", "gamma_neg"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {v!r}")
        _check_positive("saturation_lambda", self.saturation_lambda)
        _check_positive("saturation_w_th", self.saturation_w_th)
        _check_positive("mm_tau", self.mm_tau)
        if not (isinstance(self.truncate_max, (int, float)) and self.truncate_max >= 1
                and math.isfinite(self.truncate_max)):
            raise ValueError(f"truncate_max must be a finite number >= 1, got {self.truncate_max!r}")


@dataclass(frozen=True)
class IsReshapeTRParams:
    """Soft trust region: γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c), sech² shape with τ_h."""

    tau_h: float = 1.0
    tau_c: float = 1.0
    gamma_base: float = 0.1
    gamma_max: float = 0.9

    def __post_init__(self):
        _check_positive("tau_h", self.tau_h)
        _check_positive("tau_c", self.tau_c)
        _check_bounds("gamma_base", self.gamma_base, "gamma_max", self.gamma_max)


@dataclass(frozen=True)
class IsReshapeVarParams:
    """Variational γ*(w, A): γ_t = clip(γ_base·(p2+p3) + p4, 0, 1), γ_base from σ²."""

    gamma: GammaSpec = "ess"  # rule for γ_base
    rho_min: float = 0.3
    gamma_min: float = 0.0  # bounds of γ_base
    gamma_max: float = 1.0
    temperature: float = 5.0  # T of the soft case indicators σ(T·ℓ), σ(T·A)
    gamma_granularity: str = "batch"
    gamma_fallback: float = 0.3  # γ_base when PSIS finds k̂ > 0.7

    def __post_init__(self):
        _check_gamma_rule(self)
        _check_positive("temperature", self.temperature)


@dataclass(frozen=True)
class PPOClipParams:
    """max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)); dual clip −A·c for A<0."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0  # None disables the dual clip

    def __post_init__(self):
        for name in ("clip_ratio_low", "clip_ratio_high"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.clip_ratio_low >= 1:
            raise ValueError(f"clip_ratio_low must be < 1, got {self.clip_ratio_low!r}")
        c = self.clip_ratio_c
        if c is not None and not (isinstance(c, (int, float)) and c > 1 and math.isfinite(c)):
            raise ValueError(f"clip_ratio_c must be None or a finite number > 1, got {c!r}")


@dataclass(frozen=True)
class SAPOParams:
    """Soft gate: φ = A·w·sech²(τ(w−1)/2), τ = τ_pos if A>0 else τ_neg."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self):
        _check_positive("tau_pos", self.tau_pos)
        _check_positive("tau_neg", self.tau_neg)


@dataclass(frozen=True)
class VESPOParams:
    """Sequence weight φ(W) = W^k·exp(λ(1−W)), W = exp(clamp(Σ m·ℓ, ±C)) per row."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0

    def __post_init__(self):
        for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


PARAMS_BY_LOSS_TYPE = {
    "is_reshape": IsReshapeParams,
    "is_reshape_sign": IsReshapeSignParams,
    "is_reshape_tr": IsReshapeTRParams,
    "is_reshape_var": IsReshapeVarParams,
    "ppo_clip": PPOClipParams,
    "sapo": SAPOParams,
    "vespo": VESPOParams,
}


@dataclass(frozen=True)
class AggConfig:
    """verl ``agg_loss`` options (SPEC §5). ``None`` means: derive from the local batch."""

    loss_agg_mode: str = "token-mean"
    dp_size: int = 1
    global_token_count: Optional[float] = None
    global_batch_size: Optional[float] = None
    loss_scale_factor: Optional[float] = None

    def __post_init__(self):
        _check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        if isinstance(self.dp_size, bool) or not isinstance(self.dp_size, int) or self.dp_size < 1:
            raise ValueError(f"dp_size must be an int >= 1, got {self.dp_size!r}")
        for name in ("global_token_count", "global_batch_size", "loss_scale_factor"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be None or a finite number >= 0, got {v!r}")


def check_loss_type(loss_type) -> None:
    if loss_type not in PARAMS_BY_LOSS_TYPE:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def make_params(loss_type: str, params=None, **kwargs):
    """The family dataclass for ``loss_type`` from a ``params=`` instance or keyword arguments."""
    check_loss_type(loss_type)
    cls = PARAMS_BY_LOSS_TYPE[loss_type]
    if params is not None:
        if not isinstance(params, cls):
            raise TypeError(f"params must be a {cls.__name__} for loss_type={loss_type!r}, "
                            f"got {type(params).__name__}")
        return dataclasses.replace(params, **kwargs) if kwargs else params
    names = {f.name for f in dataclasses.fields(cls)}
    for key in kwargs:
        if key not in names:
            raise TypeError(f"unknown option {key!r} for loss_type={loss_type!r}; "
                            f"valid options: {sorted(names)}")
    return cls(**kwargs)
