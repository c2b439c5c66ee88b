"""What every family's reference shares: the token terms a reference returns, the overflow-free
expm1(γℓ)/γ, sech², σ and tanh whose derivatives keep their digits where they saturate, and
the masked reductions of the metrics (float64, detached).

A family's reference (``isreshape_triton/families/<name>.py``) takes the clamped log-ratio
``ell`` (ℓ, carries the gradient), the advantages ``adv`` (A, no gradient), its ``params``
and its statistics (γ, ...; detached constants) as keywords, and returns :class:`TokenTerms`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .gamma import masked_amax

ALL = (0, 1)


class TokenTerms(NamedTuple):
    """``phi``: the gradient weight φ_t (A included), detached; ``F``: the objective with
    dF/dℓ = φ (autograd through ``ell``; the per-token loss is −F; "surrogate" families use
    F = sg(φ)·ℓ); ``gamma_t``: the effective exponent of the ``ess``/``gamma_*`` metrics;
    ``extras``: per-token detached quantities whose means are metrics (by name)."""

    phi: torch.Tensor
    F: torch.Tensor
    gamma_t: torch.Tensor
    extras: dict


class _Expm1Over(torch.autograd.Function):
    """expm1(γℓ)/γ, ∂/∂ℓ = e^{γℓ}; γ is a constant.

    With x = γℓ below the smallest normal number (γ = 0, or a subnormal γ or x)
    the value is its limit ℓ (expm1(x)/x = 1 + x/2 + … rounds to 1 there), where
    expm1(x)/γ would lose the digits of a subnormal x; elsewhere it is expm1(x)/γ
    exactly. The custom backward avoids autograd's (g/γ)·e^{γℓ}·γ, which
    overflows to inf·γ for a subnormal γ. It is written in differentiable torch
    ops, so double backward works."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gamma, ell):
        x = gamma * ell
        tiny = x.abs() < torch.finfo(x.dtype).tiny
        return torch.where(tiny, ell, torch.expm1(x) / torch.where(tiny, 1.0, gamma))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        gamma, ell = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            raise RuntimeError("expm1_over: γ is a constant of the loss (detach it)")
        return None, (grad * torch.exp(gamma * ell)).sum_to_size(ell.shape)


def expm1_over(gamma, ell):
    """expm1(γℓ)/γ with its γ → 0 limit ℓ; value and gradient e^{γℓ} free of overflow
    for any finite γ ≥ 0, also subnormal (see :class:`_Expm1Over`)."""
    gamma = torch.as_tensor(gamma, dtype=ell.dtype, device=ell.device)
    return _Expm1Over.apply(gamma, ell)


def sech2_half(x):
    """sech²(x/2) = 4·σ(x)·σ(−x), accurate for large |x|."""
    return 4.0 * torch.sigmoid(x) * torch.sigmoid(-x)


def _with_derivative(value, derivative, doc: str):
    """An autograd Function computing ``value(x)`` whose backward is ``derivative(x)``, written in
    differentiable torch ops (double backward)."""

    class WithDerivative(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return value(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            x, = ctx.saved_tensors
            return grad * derivative(x)

    WithDerivative.__doc__ = doc
    return WithDerivative


_Sigmoid = _with_derivative(torch.sigmoid, lambda x: 0.25 * sech2_half(x),
                            "σ(x), ∂/∂x = σ(x)·σ(−x): autograd's σ·(1 − σ) loses every digit where σ → 1 "
                            "(fp32: x ≳ 17), the kernels' derivative does not.")
_Tanh = _with_derivative(torch.tanh, lambda x: sech2_half(2.0 * x),
                         "tanh(x), ∂/∂x = sech²(x) = 4·σ(2x)·σ(−2x): autograd's 1 − tanh² loses every digit "
                         "where |tanh| → 1.")


def sigmoid(x):
    """σ(x) whose gradient keeps its digits where σ saturates (``_Sigmoid``)."""
    return _Sigmoid.apply(x)


def tanh(x):
    """tanh(x) whose gradient keeps its digits where tanh saturates (``_Tanh``)."""
    return _Tanh.apply(x)


def ones_like(ell):
    """γ_t ≡ 1 (families without an exponent)."""
    return torch.ones_like(ell, dtype=ell.dtype).detach()


def const(x, like):
    """``x`` as a tensor of ``like``'s dtype and device."""
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def with_psis(stats: dict, p, *ks) -> dict:
    """Add the PSIS diagnostics (``psis_k``: every k̂ of the batch, flattened, float64)
    to a family's statistics when ``gamma="psis"``. ``psis_*`` keys are not
    arguments of the references (``reference.families.split_psis`` removes them)."""
    if getattr(p, "gamma", None) == "psis":
        stats["psis_k"] = torch.cat([k.reshape(-1) for k in ks])
    return stats


# ----------------------------------------------------------------------------- metric reductions
def scalar(x):
    return x.reshape(())


def masked_mean(x, mf, n):
    """Σ m·x / n over the counted tokens (0 when n = 0), float64."""
    s = torch.where(mf != 0, x.to(torch.float64), 0.0).sum()
    return torch.where(n > 0, s / n.clamp_min(1.0), 0.0)


def ess(z, group):
    """(ESS, ESS/n) = ((Σω)²/Σω², that / n) with ω = exp(z) over the group; (0, 0) if empty.

    ω is shifted by max z (the ratio is scale free)."""
    om = torch.where(group, torch.exp(z - masked_amax(z, group, ALL)), 0.0)
    s1, s2 = om.sum(), (om * om).sum()
    value = torch.where(s2 == 0, 0.0, s1 * s1 / torch.where(s2 == 0, 1.0, s2))  # NaN stays NaN
    n = group.to(torch.float64).sum()
    return value, torch.where(n > 0, value / n.clamp_min(1.0), 0.0)


def batch_or_mean(value, group, params):
    """A statistic of the family: the batch value, or with ``gamma_granularity="sequence"``
    (one value per row) its token mean over the group's counted tokens."""
    if getattr(params, "gamma_granularity", "batch") == "batch":
        return scalar(value.to(torch.float64))
    g = group.to(torch.float64)
    return masked_mean(value, g, g.sum())
