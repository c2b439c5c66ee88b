"""Per-family token formulas (SPEC §4), one small function per ``loss_type``.

Every token function takes the clamped log-ratio ``ell`` (ℓ, carries the
gradient), the advantages ``adv`` (A, no gradient) and the family's statistics
(γ, ...; detached constants) and returns :class:`TokenTerms`:

* ``phi``     — the gradient weight φ_t (A included), detached;
* ``F``       — the objective with dF/dℓ = φ (autograd through ``ell``);
  the per-token loss is −F. "Surrogate" families use F = sg(φ)·ℓ;
* ``gamma_t`` — the effective exponent for the ``ess``/``gamma_*`` metrics;
* ``extras``  — per-token detached quantities averaged into metrics.

Per-family *statistics* (what must be known from the whole batch before φ can
be evaluated) come from the ``*_stats`` functions; :data:`FAMILIES` and
:data:`STATS` map ``loss_type`` to them, :func:`phi_F` dispatches.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..params import make_params
from .gamma import dims_for, select_gamma_k, sign_gammas


class TokenTerms(NamedTuple):
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


def _ones_like(ell):
    return torch.ones_like(ell, dtype=ell.dtype).detach()


def _const(x, like):
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- is_reshape
def is_reshape(ell, adv, *, gamma):
    """φ = w^γ·A, F = A·expm1(γℓ)/γ (γ → 0: A·ℓ)."""
    gamma = _const(gamma, ell)
    ld = ell.detach()
    phi = torch.exp(gamma * ld) * adv
    F = adv * expm1_over(gamma, ell)
    return TokenTerms(phi, F, torch.broadcast_to(gamma, ell.shape), {})


def _with_psis(stats: dict, p, *ks) -> dict:
    """Add the PSIS diagnostics (``psis_k``: every k̂ of the batch, flattened, float64)
    to a family's statistics when ``gamma="psis"``. ``psis_*`` keys are not
    arguments of the token functions (:func:`split_psis` removes them)."""
    if getattr(p, "gamma", None) == "psis":
        stats["psis_k"] = torch.cat([k.reshape(-1) for k in ks])
    return stats


def split_psis(stats: dict):
    """(token-function statistics, ``psis_*`` diagnostics) of a stats dict."""
    return ({k: v for k, v in stats.items() if not k.startswith("psis_")},
            {k: v for k, v in stats.items() if k.startswith("psis_")})


def is_reshape_stats(ell, adv, mask, p, log_ratio_clamp):
    g, k = select_gamma_k(p.gamma, ell, mask, dims_for(p.gamma_granularity), rho_min=p.rho_min,
                          gamma_min=p.gamma_min, gamma_max=p.gamma_max, empty_value=p.gamma_max,
                          fallback=p.gamma_fallback)
    return _with_psis({"gamma": g.to(ell.dtype)}, p, k)


# ----------------------------------------------------------------------------- is_reshape_sign
def _power_weight(gamma, ell):
    """b = w^γ and ∫₁^w b(u)/u du = expm1(γℓ)/γ."""
    return torch.exp(gamma * ell.detach()), expm1_over(gamma, ell)


def _michaelis_menten_weight(tau, ell):
    """b = (1+τ)w/(τ+w) and ∫₁^w b(u)/u du = (1+τ)·ln((τ+w)/(τ+1))."""
    w = torch.exp(ell.detach())
    b = (1.0 + tau) * w / (tau + w)
    integral = (1.0 + tau) * torch.log1p(torch.expm1(ell) / (1.0 + tau))
    return b, integral


def _truncated_power_weight(gamma, M, ell):
    """b = min(w^γ, M); ∫ = expm1(γℓ)/γ while w^γ ≤ M, else (M−1)/γ + M·(ℓ − ln M/γ)."""
    ld = ell.detach()
    b = torch.clamp(torch.exp(gamma * ld), max=M)
    below = gamma * ld <= math.log(M)
    g_safe = torch.where(gamma == 0, 1.0, gamma)
    above = (M - 1.0) / g_safe + M * (ell - math.log(M) / g_safe)
    return b, torch.where(below, expm1_over(gamma, ell), above)


def _soft_saturated_weight(gamma, lam, w_th, ell):
    """b = β·w^γ + (1−β)·w, β = σ(−λ(w − w_th)); surrogate: ∫ replaced by sg(b)·ℓ."""
    w = torch.exp(ell.detach())
    beta = torch.sigmoid(-lam * (w - w_th))
    b = beta * torch.exp(gamma * ell.detach()) + (1.0 - beta) * w
    return b, b * ell


def is_reshape_sign(ell, adv, *, gamma_pos, gamma_neg, params):
    """A>0: w^{γ+}·A (or Michaelis-Menten); A<0: b(w)·A (``neg_saturation``); A=0: 0."""
    p = params
    gamma_pos, gamma_neg = _const(gamma_pos, ell), _const(gamma_neg, ell)
    pos, neg = adv > 0, adv < 0
    # each group's γ only where it applies: a NaN γ of one group (a non-finite token in it)
    # must not reach the other group's gradient through torch.where's backward (0·NaN)
    g_pos, g_neg = torch.where(pos, gamma_pos, 1.0), torch.where(neg, gamma_neg, 1.0)
    if p.pos_weight == "power":
        b_pos, int_pos = _power_weight(g_pos, ell)
    else:
        b_pos, int_pos = _michaelis_menten_weight(p.mm_tau, ell)
    if p.neg_saturation == "none":
        b_neg, int_neg = _power_weight(g_neg, ell)
    elif p.neg_saturation == "soft":
        b_neg, int_neg = _soft_saturated_weight(g_neg, p.saturation_lambda, p.saturation_w_th, ell)
    elif p.neg_saturation == "truncate":
        b_neg, int_neg = _truncated_power_weight(g_neg, p.truncate_max, ell)
    else:  # michaelis_menten
        b_neg, int_neg = _michaelis_menten_weight(p.mm_tau, ell)
    phi = torch.where(pos, adv * b_pos, torch.where(neg, adv * b_neg, 0.0))
    F = torch.where(pos, adv * int_pos, torch.where(neg, adv * int_neg, 0.0))
    gamma_t = torch.where(adv >= 0, gamma_pos, gamma_neg)
    return TokenTerms(phi, F, torch.broadcast_to(gamma_t, ell.shape), {})


def is_reshape_sign_stats(ell, adv, mask, p, log_ratio_clamp):
    g_pos, g_neg, k_pos, k_neg = sign_gammas(ell, adv, mask, p, dims_for(p.gamma_granularity),
                                             return_k=True)
    return _with_psis({"gamma_pos": g_pos.to(ell.dtype), "gamma_neg": g_neg.to(ell.dtype)},
                      p, k_pos, k_neg)


# ----------------------------------------------------------------------------- is_reshape_tr
def is_reshape_tr(ell, adv, *, params):
    """γ_t = γ_base + (γ_max − γ_base)·σ(−A·ℓ/τ_c) (detached);
    φ = [(1−γ_t) + γ_t·w·sech²(τ_h(w−1)/2)]·A,
    F = A·[(1−γ_t)ℓ + γ_t·(2/τ_h)·tanh(τ_h(w−1)/2)]."""
    p = params
    ld = ell.detach()
    gamma_t = p.gamma_base + (p.gamma_max - p.gamma_base) * torch.sigmoid(-adv * ld / p.tau_c)
    x = p.tau_h * torch.expm1(ld)  # τ_h(w−1)
    phi = ((1.0 - gamma_t) + gamma_t * torch.exp(ld) * sech2_half(x)) * adv
    F = adv * ((1.0 - gamma_t) * ell + gamma_t * (2.0 / p.tau_h) * torch.tanh(p.tau_h * torch.expm1(ell) / 2.0))
    return TokenTerms(phi, F, gamma_t, {})


def no_stats(ell, adv, mask, p, log_ratio_clamp):
    return {}


# ----------------------------------------------------------------------------- is_reshape_var
def is_reshape_var(ell, adv, *, gamma_base, params):
    """p_hi = σ(Tℓ), p_lo = σ(−Tℓ), p_pos = σ(T·A), p_neg = σ(−T·A);
    γ_t = clip(γ_base·(p2+p3) + p4, 0, 1) (detached); φ = w^{γ_t}·A, F = A·expm1(γ_tℓ)/γ_t."""
    T = params.temperature
    ld = ell.detach()
    p_hi, p_lo = torch.sigmoid(T * ld), torch.sigmoid(-T * ld)
    p_pos, p_neg = torch.sigmoid(T * adv), torch.sigmoid(-T * adv)
    p1, p2, p3, p4 = p_hi * p_pos, p_hi * p_neg, p_lo * p_pos, p_lo * p_neg
    gamma_t = torch.clamp(_const(gamma_base, ell) * (p2 + p3) + p4, 0.0, 1.0)
    phi = torch.exp(gamma_t * ld) * adv
    F = adv * expm1_over(gamma_t, ell)
    extras = {"p_case1": p1, "p_case2": p2, "p_case3": p3, "p_case4": p4}
    return TokenTerms(phi, F, gamma_t, extras)


def is_reshape_var_stats(ell, adv, mask, p, log_ratio_clamp):
    g, k = select_gamma_k(p.gamma, ell, mask, dims_for(p.gamma_granularity), rho_min=p.rho_min,
                          gamma_min=p.gamma_min, gamma_max=p.gamma_max, empty_value=p.gamma_max,
                          fallback=p.gamma_fallback)
    return _with_psis({"gamma_base": g.to(ell.dtype)}, p, k)


# ----------------------------------------------------------------------------- ppo_clip
def ppo_clip(ell, adv, *, params):
    """loss = max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)); A<0 with dual clip: min(loss, −A·c).

    φ = A·w where the unclipped branch is the active one, else 0. Branches are
    picked with ``torch.where`` on detached values (ties go to the unclipped
    branch), so autograd gives exactly that φ.
    """
    p = params
    w = torch.exp(ell)
    wd = w.detach()
    unclipped = -adv * w
    clipped = -adv * torch.clamp(w, 1.0 - p.clip_ratio_low, 1.0 + p.clip_ratio_high)
    take_unclipped = unclipped.detach() >= clipped.detach()
    loss = torch.where(take_unclipped, unclipped, clipped)
    if p.clip_ratio_c is not None:
        dual_bound = -adv * p.clip_ratio_c
        dual = (adv < 0) & (loss.detach() > dual_bound)
        loss = torch.where(dual, dual_bound, loss)
    else:
        dual = torch.zeros_like(take_unclipped)
    phi = torch.where(take_unclipped & ~dual, adv * wd, 0.0)
    extras = {"clipfrac": (clipped.detach() > unclipped.detach()).to(ell.dtype),
              "clipfrac_lower": dual.to(ell.dtype)}
    return TokenTerms(phi, -loss, _ones_like(ell), extras)


# ----------------------------------------------------------------------------- sapo
def sapo(ell, adv, *, params):
    """τ = τ_pos if A > 0 else τ_neg; φ = A·w·sech²(τ(w−1)/2), F = A·(4/τ)·σ(τ(w−1))."""
    p = params
    tau = torch.where(adv > 0, _const(p.tau_pos, ell), _const(p.tau_neg, ell))
    ld = ell.detach()
    phi = adv * torch.exp(ld) * sech2_half(tau * torch.expm1(ld))
    F = adv * (4.0 / tau) * torch.sigmoid(tau * torch.expm1(ell))
    return TokenTerms(phi, F, _ones_like(ell), {})


# ----------------------------------------------------------------------------- vespo
def vespo(ell, adv, *, log_W, first_adv, params):
    """Surrogate: φ_t = φ(W_b)·A_t, φ(W) = W^k·exp(λ(1−W)) = exp(k·log W + λ(1−W)),
    (k, λ) = (k_pos, λ_pos) if the row's first counted advantage ≥ 0 else (k_neg, λ_neg), NaN if
    it is not finite; F = sg(φ)·ℓ."""
    p = params
    log_W, first_adv = _const(log_W, ell), _const(first_adv, ell)
    nonneg = first_adv >= 0
    k = torch.where(nonneg, _const(p.k_pos, ell), _const(p.k_neg, ell))
    lam = torch.where(nonneg, _const(p.lambda_pos, ell), _const(p.lambda_neg, ell))
    phi_row = torch.exp(k * log_W + lam * (1.0 - torch.exp(log_W)))
    phi_row = torch.where(torch.isfinite(first_adv), phi_row, math.nan)  # sign unknown: SPEC §11
    phi = phi_row * adv
    return TokenTerms(phi, phi * ell, _ones_like(ell), {})


def vespo_stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    """log W_b = clamp(Σ_t m_t (ℓ_t + log max(r_t, 1e-8)), ±C) (rollout IS weights r, when
    given, folded in before the clamp); A of each row's first counted token."""
    mf = mask.to(ell.dtype)
    z = ell if log_rollout is None else ell + log_rollout
    log_W = torch.clamp((mf * z).sum(dim=-1, keepdim=True), -log_ratio_clamp, log_ratio_clamp)
    first = mask & (torch.cumsum(mf, dim=-1) == 1)
    first_adv = torch.where(first, adv, 0.0).sum(dim=-1, keepdim=True)
    return {"log_W": log_W, "first_adv": first_adv}


# ----------------------------------------------------------------------------- tables
FAMILIES = {
    "is_reshape": is_reshape,
    "is_reshape_sign": is_reshape_sign,
    "is_reshape_tr": is_reshape_tr,
    "is_reshape_var": is_reshape_var,
    "ppo_clip": ppo_clip,
    "sapo": sapo,
    "vespo": vespo,
}
STATS = {
    "is_reshape": is_reshape_stats,
    "is_reshape_sign": is_reshape_sign_stats,
    "is_reshape_tr": no_stats,
    "is_reshape_var": is_reshape_var_stats,
    "ppo_clip": no_stats,
    "sapo": no_stats,
    "vespo": vespo_stats,
}
_TAKES_PARAMS = {"is_reshape_sign", "is_reshape_tr", "is_reshape_var", "ppo_clip", "sapo", "vespo"}


def phi_F(loss_type, ell, adv=None, params=None, **stats) -> TokenTerms:
    """φ, F (and γ_t, extras) of ``loss_type`` for tokens with log-ratio ``ell``.

    ``ell``/``adv`` may be tensors or numbers (``adv=None`` → A ≡ 1); ``params``
    a family dataclass (default: SPEC defaults); ``stats`` the family's batch
    statistics as keywords: ``gamma`` (is_reshape), ``gamma_pos``/``gamma_neg``
    (is_reshape_sign), ``gamma_base`` (is_reshape_var), ``log_W``/``first_adv``
    (vespo). No validation or masking: the raw SPEC formulas.
    """
    params = make_params(loss_type, params)
    ell = ell if isinstance(ell, torch.Tensor) else torch.tensor(ell, dtype=torch.float64)
    adv = torch.ones_like(ell) if adv is None else torch.as_tensor(adv, dtype=ell.dtype, device=ell.device)
    stats = split_psis(stats)[0]
    if loss_type in _TAKES_PARAMS:
        stats["params"] = params
    return FAMILIES[loss_type](ell, adv, **stats)


def family_stats(loss_type, ell, adv, mask, params, log_ratio_clamp=20.0) -> dict:
    """The batch statistics of ``loss_type`` (detached, broadcastable to ``[R, T]``).

    With ``gamma="psis"`` also ``psis_k`` (all k̂ values, flattened; a diagnostic,
    ignored by :func:`phi_F`)."""
    return STATS[loss_type](ell.detach(), adv, mask, params, log_ratio_clamp)
