"""``policy_loss``: the pure-PyTorch oracle of the fused op (SPEC §2-6).

Flow: validate (params, aggregation options, tensors) → upcast and sanitize
masked positions → ℓ (clamp that passes the gradient) → the family's batch
statistics (detached) → per-token φ, F → aggregate(−F) → metrics.

Non-finite policy (SPEC §11). A *non-finite token* is a counted token whose
d = log_prob − old_log_prob (in the compute dtype), advantage, rollout IS weight (given, or
computed from rollout_log_prob) or x = log_prob − ref_log_prob of the KL term is NaN or ±inf;
``nonfinite_tokens`` counts them. A non-finite d makes the token's ℓ NaN (never
clamped to ±C), so every statistic over a group that holds it (σ², γ of every
rule, VESPO's row weight, the ℓ-metrics) is NaN. A non-finite advantage is read
as NaN: the token belongs to neither sign group and leaves the statistics of ℓ
alone. Either way its φ and F are NaN, so the loss is NaN and so is
∂loss/∂log_prob at that token (and at every token whose γ or W is NaN).
Masked positions are replaced by 0 before any arithmetic: they stay isolated.

Packed inputs (``cu_seqlens``) are padded to ``[S, longest]`` first (one sync).
"""
from __future__ import annotations

import math

import torch

from ..inputs import pad_packed, prepare_inputs
from ..params import (AggConfig, check_correction_family, check_log_ratio_clamp, check_process_group, kl_config,
                      make_params, rollout_config)
from .aggregation import aggregate
from .diagnostics import compute_metrics
from ..families import FAMILIES
from .families import family_stats, split_psis
from .rollout import log_ratio, rollout_metrics, rollout_terms
from .shared import TokenTerms


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 ``log_prob``, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def counted(response_mask, like: torch.Tensor) -> torch.Tensor:
    """Boolean ``[R, T]`` mask of the counted tokens: nonzero entries (any dtype, fp8 included)."""
    if response_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return response_mask != 0


def poison(terms: TokenTerms, nan: torch.Tensor, ell: torch.Tensor) -> TokenTerms:
    """φ, F and the per-token extras NaN where ``nan`` is NaN (0 elsewhere); F + nan·ℓ also
    makes ∂F/∂ℓ NaN there, whatever the family's formula does with a NaN ℓ."""
    extras = {k: v + nan for k, v in terms.extras.items()}
    return TokenTerms(terms.phi + nan, terms.F + nan * ell, terms.gamma_t, extras)


def policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                loss_type="is_reshape", loss_agg_mode="token-mean", *,
                dp_size=1, global_token_count=None, global_batch_size=None, loss_scale_factor=None,
                log_ratio_clamp=20.0, cu_seqlens=None, validate=False, rollout_is_weights=None,
                ref_log_prob=None, kl_coef=None, kl_type="low_var_kl", kl_correction=None, process_group=None,
                rollout_log_prob=None, rollout_correction=None, params=None, _token_position=None,
                **family_params):
    """Aggregated loss (0-dim, fp32 / fp64) and the metrics dict of ``loss_type``.

    ∂loss/∂log_prob_t = −s_t·m_t·φ_t; ``old_log_prob`` and ``advantages`` are
    treated as constants (no gradient flows to them). ``_token_position`` (internal): the kernels'
    number of each [R, T] slot, which clip_cov's random key hashes (default r·T + t; packed
    inputs: the packed index).
    """
    correction = rollout_config(rollout_is_weights, rollout_log_prob, rollout_correction)
    if cu_seqlens is not None:  # the padded form: every row rule applies per sequence
        x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, 20.0, cu_seqlens, validate,
                           rollout_is_weights, ref_log_prob, rollout_log_prob)
        longest = int((x.cu_seqlens[1:] - x.cu_seqlens[:-1]).max()) if x.rows else 0
        position = x.cu_seqlens[:-1, None].to(torch.int64) + torch.arange(longest, device=x.cu_seqlens.device)
        x = pad_packed(x, longest)
        rollout = ({"rollout_is_weights": x.rollout} if correction is None
                   else {"rollout_log_prob": x.rollout, "rollout_correction": correction})
        return policy_loss(x.log_prob, x.old_log_prob, x.advantages, x.response_mask, loss_type,
                           loss_agg_mode, dp_size=dp_size, global_token_count=global_token_count,
                           global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
                           log_ratio_clamp=log_ratio_clamp, **rollout,
                           ref_log_prob=x.ref_log_prob, kl_coef=kl_coef, kl_type=kl_type,
                           kl_correction=kl_correction, process_group=process_group, params=params,
                           _token_position=position, **family_params)
    check_process_group(process_group)
    if process_group is not None:
        raise NotImplementedError("process_group is supported on the kernel path")
    C = check_log_ratio_clamp(log_ratio_clamp)
    p = make_params(loss_type, params, **family_params)
    check_correction_family(correction, loss_type, p)
    agg = AggConfig(loss_agg_mode, dp_size, global_token_count, global_batch_size, loss_scale_factor)
    kl = kl_config(kl_coef, kl_type, ref_log_prob, kl_correction)
    x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, C, None, False,
                       rollout_is_weights, ref_log_prob, rollout_log_prob)
    agg.check_device(x.log_prob.device)
    dt = compute_dtype(x.log_prob)

    # Mask (binarized) and sanitized inputs: masked positions become 0 *before* any
    # arithmetic, so NaN/inf there touch neither values nor gradients. The rollout
    # correction's rejection leaves the mask first.
    mask = counted(x.response_mask, x.log_prob)
    if correction is not None:
        mask0 = mask
        x_r = log_ratio(x.log_prob, x.old_log_prob, x.rollout, mask0, correction, dt)
        r_corr, keep, rho = rollout_terms(x_r, mask0, correction, C)
        mask = mask0 & keep
    lp = torch.where(mask, x.log_prob.to(dt), 0.0)
    olp = torch.where(mask, x.old_log_prob.detach().to(dt), 0.0)
    if x.advantages is None:
        adv = torch.ones_like(lp).detach()
    else:
        adv = torch.where(mask, x.advantages.detach().to(dt), 0.0)
        adv = torch.where(torch.isfinite(adv), adv, math.nan)

    # ℓ = clamp(d, −C, C) in value, identity in gradient; NaN where d is not finite
    d = lp - olp
    bad_d = mask & ~torch.isfinite(d.detach())
    bad = bad_d | (mask & torch.isnan(adv))
    r = None
    if correction is not None:  # computed from the rollout log-probs; a token is bad by its own x (a row's
        r = torch.where(mask, r_corr, 1.0)  # NaN weight poisons its tokens through r)
        bad = bad | (mask & torch.isnan(x_r))
    elif x.rollout is not None:  # rollout IS weights: detached, NaN where not finite
        r = torch.where(mask, x.rollout.detach().to(dt), 1.0)
        r = torch.where(torch.isfinite(r), r, math.nan)
        bad = bad | (mask & torch.isnan(r))
    ell = torch.clamp(d.detach(), -C, C) + (d - d.detach()) + torch.where(bad_d, math.nan, 0.0).to(dt)
    k = None
    if x.ref_log_prob is not None:  # verl's kl_penalty of x = log π − log π_ref
        kx = lp - torch.where(mask, x.ref_log_prob.detach().to(dt), 0.0)  # non-finite: NaN (not clamped)
        kx = kx + torch.where(torch.isfinite(kx.detach()), 0.0, math.nan).to(dt)
        k = kl_term(kx, ell, kl)
        bad = bad | (mask & torch.isnan(k.detach()))
    nan = torch.where(bad, math.nan, 0.0).to(dt)

    family = FAMILIES[loss_type]
    position = (torch.arange(lp.numel(), device=lp.device).reshape(lp.shape) if _token_position is None
                else _token_position)
    in_row = family.rollout_in_row  # rollout IS weights enter the row weight, not each token
    log_rollout = torch.log(r.clamp_min(1e-8)) if in_row and r is not None else None
    stats, diag = split_psis(family_stats(loss_type, ell, adv, mask, p, C, log_rollout, lp, position))
    log_probs = {"lp": lp, "olp": olp} if family.log_probs else {}
    terms = poison(family.reference(ell, adv, params=p, **log_probs, **stats), nan, ell)

    L = -terms.F if r is None or in_row else -terms.F * r
    extra = {}
    if k is not None:
        L = L + kl.kl_coef * k
        extra["kl_loss"] = aggregate(k.detach(), mask, agg).to(dt)
    if correction is not None:
        extra.update(rollout_metrics(r_corr, rho, x_r, mask0, keep, correction, dt))
    loss = aggregate(L, mask, agg)
    metrics = compute_metrics(loss_type, ell, adv, mask, terms, {**stats, **diag}, p, dt,
                              nonfinite=bad)
    return loss, {**metrics, **extra}


def kl_term(x: torch.Tensor, ell: torch.Tensor, kl) -> torch.Tensor:
    """The KL term k_t of x = log π − log π_ref (``KLConfig``): verl's ``kl_penalty``, with
    ``kl_correction="ratio"`` times w = exp(ℓ) (TRL's use_bias_correction_kl: the gradient
    flows through w too), ``"unbiased"`` with the value k and the gradient min(w, 10)·x
    (OpenRLHF's unbiased_gradient, w detached)."""
    k = kl_penalty(x, kl.kl_type)
    if kl.kl_correction == "ratio":
        return k * torch.exp(ell)
    if kl.kl_correction == "unbiased":
        surrogate = torch.exp(ell.detach()).clamp(max=10.0) * 0.5 * x.square()
        return k.detach() + surrogate - surrogate.detach()
    return k


def kl_penalty(x: torch.Tensor, kl_type: str) -> torch.Tensor:
    """verl's ``kl_penalty`` of x = log π − log π_ref (SPEC §4.1), differentiable in x; a name
    ending in "+": the value of the name without it, the gradient of k2 (verl's straight-through)."""
    if kl_type.endswith("+"):
        k2 = 0.5 * x.square()
        return kl_penalty(x, kl_type[:-1]).detach() + k2 - k2.detach()
    if kl_type in ("kl", "k1"):
        return x
    if kl_type == "abs":
        return x.abs()
    if kl_type in ("mse", "k2"):
        return 0.5 * x.square()
    kappa = torch.clamp(-x, min=-20, max=20)  # low_var_kl / k3
    return torch.clamp(kappa.exp() - kappa - 1, min=-10, max=10)
