"""Validation of options (SPEC §11): numbers, names, the option dataclasses' base and the
γ-rule fields; shared by every family module (``families/``) and ``params.py``. Errors
name the offending argument.

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
import struct
from typing import Union

import torch

GAMMA_MODES = ("ess", "ess_exact", "psis")
GRANULARITIES = ("batch", "sequence")
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
FP32_TRUE_MIN = 2.0 ** -149  # smallest positive fp32 subnormal

GammaSpec = Union[str, float]


# ----------------------------------------------------------------------------- numbers
def as_number(v):
    """``v`` as a Python float; a symbolic float (``torch.SymFloat``: a float argument that
    torch.compile traces as a graph input) stays symbolic, so a new value does not recompile."""
    return v if isinstance(v, torch.SymFloat) else float(v)


def shown(value):
    """``value`` for an error message: a symbolic float's traced example value."""
    return value.node.hint if isinstance(value, torch.SymFloat) else value


def fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, as a kernel's scalar argument receives it."""
    return struct.unpack("f", struct.pack("f", value))[0]


def as_real(name: str, value) -> float:
    """``value`` as a Python float: a real number (not a bool), finite, representable in fp32.
    A ``torch.SymFloat`` passes the same checks as comparisons (range guards, no value guard)."""
    if not isinstance(value, torch.SymFloat) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number (int, float or numpy scalar), "
                        f"got {type(value).__name__} {value!r}")
    v = as_number(value)
    if not (-math.inf < v < math.inf):  # NaN fails too
        raise ValueError(f"{name} must be finite, got {shown(value)!r}")
    if abs(v) > FP32_MAX or (v != 0 and abs(v) < FP32_TRUE_MIN):
        raise ValueError(f"{name}={shown(value)!r} is not representable in fp32: it must be 0 or have a "
                         f"magnitude in [{FP32_TRUE_MIN:.4g}, {FP32_MAX:.6g}]")
    return v


def real_in(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
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
        raise ValueError(f"{name} must be {what}, got {shown(value)!r}")
    return v


def set_real(obj, name: str, optional: bool = False, **bounds) -> None:
    """Validate the field ``name`` of a frozen dataclass and store it as a Python float."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    object.__setattr__(obj, name, real_in(name, value, **bounds))


def did_you_mean(value, choices) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to a misspelt one, else ``""``."""
    near = difflib.get_close_matches(value, list(choices), n=1) if isinstance(value, str) else []
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}{did_you_mean(value, choices)}")


def unknown_option(key: str, valid, owner: str, shared=()) -> TypeError:
    hint = did_you_mean(key, list(valid) + list(shared))
    also = f"; shared options: {list(shared)}" if shared else ""
    return TypeError(f"unknown option {key!r} for {owner}{hint}; valid options: {sorted(valid)}{also}")


class Options:
    """Base of the option dataclasses: an unknown keyword is a clear TypeError that lists
    the valid names (also through ``dataclasses.replace``), not a raw ``__init__`` error."""

    def __new__(cls, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                raise unknown_option(key, names, cls.__name__)
        return super().__new__(cls)


# ----------------------------------------------------------------------------- γ rules
def set_gamma_spec(p) -> None:
    gamma = p.gamma
    if isinstance(gamma, str):
        check_choice("gamma", gamma, GAMMA_MODES)
    elif isinstance(gamma, bool) or not isinstance(gamma, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"gamma must be one of {GAMMA_MODES} or a float, got {gamma!r}")
    else:
        set_real(p, "gamma")


def set_gamma_rule(p) -> None:
    """The γ-rule fields shared by is_reshape and is_reshape_var."""
    set_gamma_spec(p)
    set_real(p, "rho_min", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    set_real(p, "gamma_min", lo=0.0)
    set_real(p, "gamma_max", lo=0.0)
    if p.gamma_min > p.gamma_max:
        raise ValueError(f"gamma_min ({p.gamma_min}) must not exceed gamma_max ({p.gamma_max})")
    if not isinstance(p.gamma, str) and not p.gamma_min <= p.gamma <= p.gamma_max:  # range guards only
        raise ValueError(f"gamma={shown(p.gamma)!r} is outside [gamma_min, gamma_max] = "
                         f"[{shown(p.gamma_min)!r}, {shown(p.gamma_max)!r}]: a fixed gamma must lie within "
                         f"its bounds (widen gamma_min/gamma_max to use it)")
    check_choice("gamma_granularity", p.gamma_granularity, GRANULARITIES)
    if p.gamma in ("ess_exact", "psis") and p.gamma_max > 1.0:
        raise ValueError(f"gamma_max must be <= 1 with gamma={p.gamma!r}, got {p.gamma_max!r}")
    set_real(p, "gamma_fallback", lo=0.0, hi=1.0)
