"""Eager PyTorch baselines: the loss code RL trainers run today, one per family.

Written in the style of verl's ``compute_policy_loss_*`` functions and their
seeds' reference code: log-ratio, ``torch.clamp``, ``torch.exp``, the batch
variance of the masked log-ratio via boolean indexing and ``.item()``, the
family's math in separate elementwise ops, verl's ``agg_loss``, and metrics
logged with ``.item()``.  They are baselines for *cost*, not oracles: the
package's reference (``irt.reference.policy_loss``) is the oracle.

Every function takes ``(log_prob, old_log_prob, advantages, response_mask,
loss_agg_mode)`` and returns ``(loss, metrics)`` with ``metrics`` Python floats.
"""
from __future__ import annotations

import math

import torch

CLAMP = 20.0


# ----------------------------------------------------------------------------- verl helpers

def masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def masked_var(values, mask):
    """What seed/trainer code does: boolean-index the counted tokens, torch.var."""
    selected = values[mask.bool()]
    if selected.numel() < 2:
        return 0.0
    return torch.var(selected.float()).item()


def agg_loss(loss_mat, loss_mask, loss_agg_mode):
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum()
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        return torch.mean(seq_losses)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (torch.sum(loss_mask, dim=-1) + 1e-8)
        return torch.mean(seq_losses)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        return torch.sum(seq_losses) / loss_mask.shape[-1]
    raise ValueError(f"invalid loss_agg_mode: {loss_agg_mode}")


def _fp32_advantages(fn):
    """Trainers keep advantages in fp32 whatever the log-prob dtype (one cast for bf16 input)."""
    def wrapped(log_prob, old_log_prob, advantages, response_mask, *args, **kwargs):
        return fn(log_prob, old_log_prob, advantages.float(), response_mask, *args, **kwargs)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def _log_ratio(log_prob, old_log_prob):
    negative_approx_kl = log_prob.float() - old_log_prob.float()
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-CLAMP, max=CLAMP)
    ratio = torch.exp(negative_approx_kl)
    return negative_approx_kl, ratio


def _gamma_from_var(var, rho_min=0.3, lo=0.05, hi=1.0):
    if var < 1e-8:
        return hi
    return min(max(math.sqrt(-math.log(rho_min) / var), lo), hi)


def _common_metrics(log_ratio, ratio, phi, mask, weights):
    """The metrics trainers log, each pulled to the host with .item()."""
    ess = (weights * mask).sum() ** 2 / ((weights ** 2 * mask).sum() + 1e-8)
    n = mask.sum().item()
    return {
        "token_count": n,
        "ppo_kl": masked_mean(-log_ratio, mask).item(),
        "w_mean": masked_mean(ratio, mask).item(),
        "w_max": torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max().item(),
        "phi_mean": masked_mean(phi, mask).item(),
        "phi_abs_max": (phi.abs() * mask).max().item(),
        "ess": ess.item(),
        "ess_ratio": ess.item() / max(n, 1),
    }


# ----------------------------------------------------------------------------- families

def is_reshape(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean"):
    mask = response_mask.float()
    log_ratio, ratio = _log_ratio(log_prob, old_log_prob)
    var = masked_var(log_ratio.detach(), response_mask)
    gamma = _gamma_from_var(var)
    weights = torch.pow(ratio.detach(), gamma)
    phi = weights * advantages
    pg_losses = -advantages * torch.expm1(gamma * log_ratio) / gamma
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    metrics = _common_metrics(log_ratio.detach(), ratio.detach(), phi, mask, weights)
    metrics.update(gamma=gamma, sigma_sq=var)
    return pg_loss, metrics


def is_reshape_sign(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                    rho_min=0.3, lam=1.0, w_th=3.0):
    mask = response_mask.float()
    log_ratio, ratio = _log_ratio(log_prob, old_log_prob)
    pos = (advantages > 0) & response_mask.bool()
    neg = (advantages < 0) & response_mask.bool()
    var_pos = masked_var(log_ratio.detach(), pos)
    var_neg = masked_var(log_ratio.detach(), neg)
    gamma_pos = 0.5 if pos.sum().item() == 0 else (
        0.99 if var_pos < 1e-8 else min(max(math.sqrt(-math.log(rho_min) / var_pos), 0.05), 0.99))
    gamma_neg = 1.5 if neg.sum().item() == 0 else (
        1.99 if var_neg < 1e-8 else min(max(1 + min(0.99, math.sqrt(-math.log(rho_min) / var_neg)), 1.01), 1.99))
    w = ratio.detach()
    beta = torch.sigmoid(-lam * (w - w_th))
    b_neg = beta * torch.pow(w, gamma_neg) + (1 - beta) * w
    w_pos = torch.pow(w, gamma_pos)
    phi = torch.where(advantages > 0, w_pos * advantages,
                      torch.where(advantages < 0, b_neg * advantages, torch.zeros_like(w)))
    pos_obj = advantages * torch.expm1(gamma_pos * log_ratio) / gamma_pos
    neg_obj = phi.detach() * log_ratio  # soft saturation: surrogate
    pg_losses = -torch.where(advantages > 0, pos_obj, torch.where(advantages < 0, neg_obj, 0.0 * log_ratio))
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    weights = torch.where(advantages >= 0, w_pos, torch.pow(w, gamma_neg))
    metrics = _common_metrics(log_ratio.detach(), w, phi, mask, weights)
    metrics.update(gamma_pos=gamma_pos, gamma_neg=gamma_neg, sigma_sq_pos=var_pos, sigma_sq_neg=var_neg,
                   sigma_sq=masked_var(log_ratio.detach(), response_mask))
    return pg_loss, metrics


def is_reshape_tr(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                  tau_h=1.0, tau_c=1.0, gamma_base=0.1, gamma_max=0.9):
    mask = response_mask.float()
    log_ratio, ratio = _log_ratio(log_prob, old_log_prob)
    gamma_t = (gamma_base + (gamma_max - gamma_base)
               * torch.sigmoid(-advantages * log_ratio.detach() / tau_c)).detach()
    h = 1.0 - torch.tanh(tau_h * (ratio.detach() - 1) / 2) ** 2
    phi = ((1 - gamma_t) + gamma_t * ratio.detach() * h) * advantages
    objective = advantages * ((1 - gamma_t) * log_ratio
                              + gamma_t * (2.0 / tau_h) * torch.tanh(tau_h * (ratio - 1) / 2))
    pg_loss = agg_loss(-objective, mask, loss_agg_mode)
    weights = torch.pow(ratio.detach(), gamma_t)
    metrics = _common_metrics(log_ratio.detach(), ratio.detach(), phi, mask, weights)
    metrics.update(gamma_mean=masked_mean(gamma_t, mask).item(),
                   sigma_sq=masked_var(log_ratio.detach(), response_mask))
    return pg_loss, metrics


def is_reshape_var(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                   temperature=5.0):
    mask = response_mask.float()
    log_ratio, ratio = _log_ratio(log_prob, old_log_prob)
    var = masked_var(log_ratio.detach(), response_mask)
    gamma_base = _gamma_from_var(var, lo=0.0, hi=1.0)
    lr = log_ratio.detach()
    p_hi, p_lo = torch.sigmoid(temperature * lr), torch.sigmoid(-temperature * lr)
    p_pos, p_neg = torch.sigmoid(temperature * advantages), torch.sigmoid(-temperature * advantages)
    p1, p2, p3, p4 = p_hi * p_pos, p_hi * p_neg, p_lo * p_pos, p_lo * p_neg
    gamma_t = torch.clamp(gamma_base * (p2 + p3) + p4, 0.0, 1.0)
    safe_gamma = torch.clamp(gamma_t, min=1e-6)
    objective = advantages * torch.where(gamma_t > 1e-6, torch.expm1(safe_gamma * log_ratio) / safe_gamma,
                                         log_ratio)
    pg_loss = agg_loss(-objective, mask, loss_agg_mode)
    weights = torch.pow(ratio.detach(), gamma_t)
    phi = weights * advantages
    metrics = _common_metrics(lr, ratio.detach(), phi, mask, weights)
    metrics.update(gamma_base=gamma_base, sigma_sq=var, gamma_mean=masked_mean(gamma_t, mask).item(),
                   **{f"p_case{i}": masked_mean(p, mask).item() for i, p in enumerate((p1, p2, p3, p4), 1)})
    return pg_loss, metrics


def ppo_clip(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
             cliprange_low=0.2, cliprange_high=0.2, clip_ratio_c=3.0):
    """verl's compute_policy_loss_vanilla (dual-clip PPO)."""
    mask = response_mask.float()
    negative_approx_kl, ratio = _log_ratio(log_prob, old_log_prob)
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    metrics = {"pg_clipfrac": pg_clipfrac.item(), "ppo_kl": ppo_kl.item(),
               "pg_clipfrac_lower": pg_clipfrac_lower.item()}
    return pg_loss, metrics


def sapo(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
         tau_pos=1.0, tau_neg=1.05):
    mask = response_mask.float()
    log_ratio, ratio = _log_ratio(log_prob, old_log_prob)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1)) * 4.0 / tau
    pg_losses = -advantages * gate
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    w = ratio.detach()
    phi = advantages * w * (1 - torch.tanh(tau * (w - 1) / 2) ** 2)
    metrics = _common_metrics(log_ratio.detach(), w, phi, mask, w)
    return pg_loss, metrics


def vespo(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
          k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    mask = response_mask.float()
    log_ratio, ratio = _log_ratio(log_prob, old_log_prob)
    seq_log_w = torch.clamp((log_ratio.detach() * mask).sum(-1), -CLAMP, CLAMP)
    seq_w = torch.exp(seq_log_w)
    first = mask.argmax(dim=-1, keepdim=True)  # first counted token of each row
    seq_adv = advantages.gather(-1, first).squeeze(-1)
    k = torch.where(seq_adv >= 0, k_pos, k_neg)
    lam = torch.where(seq_adv >= 0, lambda_pos, lambda_neg)
    seq_phi = torch.pow(seq_w, k) * torch.exp(lam * (1 - seq_w))
    phi = seq_phi.unsqueeze(-1) * advantages
    pg_losses = -(phi.detach() * log_ratio)
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    metrics = _common_metrics(log_ratio.detach(), ratio.detach(), phi, mask, ratio.detach())
    metrics.update(seq_w_mean=seq_w.mean().item())
    return pg_loss, metrics


def gpg(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean"):
    """verl's compute_policy_loss_gpg."""
    pg_losses = -log_prob.float() * advantages
    return agg_loss(pg_losses, response_mask.float(), loss_agg_mode), {}


def cispo(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
          clip_ratio_low=0.2, clip_ratio_high=0.2):
    """verl's compute_policy_loss_cispo."""
    mask = response_mask.float()
    negative_approx_kl, ratio = _log_ratio(log_prob, old_log_prob)
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = -clipped_ratio.detach() * advantages * log_prob.float()
    pg_clipfrac = masked_mean((ratio != clipped_ratio).float(), mask)
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    return pg_loss, {"pg_clipfrac": pg_clipfrac.item(), "ppo_kl": ppo_kl.item(), "pg_clipfrac_lower": 0.0}


def dro(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean", beta=0.1):
    """verl's compute_policy_loss_dro."""
    mask = response_mask.float()
    log_ratio = log_prob.float() - old_log_prob.float()
    pg_losses = -(log_prob.float() * advantages - 0.5 * beta * log_ratio.square())
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    return pg_loss, {"ppo_kl": masked_mean(-log_ratio, mask).item()}


def dppo(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
         clip_divergence_low=0.2, clip_divergence_high=0.2, clip_ratio_c=20.0):
    """verl's compute_policy_loss_dppo_tv."""
    mask = response_mask.float()
    negative_approx_kl, ratio = _log_ratio(log_prob, old_log_prob)
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    truncated_ratio = torch.clamp(ratio, max=clip_ratio_c).detach()
    prob, old_prob = torch.exp(log_prob.float()), torch.exp(old_log_prob.float())
    valid_positive_mask = (prob - old_prob) <= clip_divergence_high
    valid_negative_mask = (prob - old_prob) >= -clip_divergence_low
    valid_mask = torch.where(advantages > 0, valid_positive_mask, valid_negative_mask).detach().float()
    pg_losses = -advantages * truncated_ratio * log_prob.float() * valid_mask
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    pg_clipfrac = masked_mean((1.0 - valid_mask).float(), mask)
    pg_clipfrac_lower = masked_mean((ratio > clip_ratio_c).float() * valid_mask, mask)
    return pg_loss, {"pg_clipfrac": pg_clipfrac.item(), "ppo_kl": ppo_kl.item(),
                     "pg_clipfrac_lower": pg_clipfrac_lower.item()}


def gspo(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
         clip_ratio_low=3e-4, clip_ratio_high=4e-4):
    """verl's compute_policy_loss_gspo."""
    mask = response_mask.float()
    negative_approx_kl = log_prob.float() - old_log_prob.float()
    seq_lengths = torch.sum(mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * mask, dim=-1) / seq_lengths
    lp = log_prob.float()
    log_seq_importance_ratio = lp - lp.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    seq_importance_ratio = torch.exp(torch.clamp(log_seq_importance_ratio, max=10.0))
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    return pg_loss, {"pg_clipfrac": pg_clipfrac.item(), "ppo_kl": ppo_kl.item(), "pg_clipfrac_lower": 0.0}


def gmpo(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
         clip_ratio_low=0.4, clip_ratio_high=0.4):
    """verl's compute_policy_loss_geo_mean."""
    mask = response_mask.float()
    negative_approx_kl = log_prob.float() - old_log_prob.float()
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -clip_ratio_low, clip_ratio_high)
    negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
    response_mask_sum = mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * mask).sum(dim=-1) / (response_mask_sum + 1e-8))
    advantage = (advantages * mask).sum(dim=-1) / (response_mask_sum + 1e-8)
    pg_loss = torch.mean(-advantage * ratio)
    clipped = torch.ne(negative_approx_kl, negative_approx_kl_clamp)
    pg_clipfrac = masked_mean((clipped * (advantages > 0)).float(), mask)
    pg_clipfrac_lower = masked_mean((clipped * (advantages < 0)).float(), mask)
    return pg_loss, {"pg_clipfrac": pg_clipfrac.item(), "ppo_kl": ppo_kl.item(),
                     "pg_clipfrac_lower": pg_clipfrac_lower.item()}


def _covariance(log_prob, advantages, mask):
    """verl's cov of the Cov families: (A − masked mean A)·(log π − masked mean log π)."""
    return (advantages - masked_mean(advantages, mask)) * (log_prob - masked_mean(log_prob.detach(), mask))


def clip_cov(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
             clip_ratio=0.2, clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0):
    """verl's compute_policy_loss_clip_cov: boolean indexing, .item() and a CPU randperm."""
    mask = response_mask.float()
    negative_approx_kl, ratio = _log_ratio(log_prob, old_log_prob)
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    clip_by_origin = (pg_losses2 > pg_losses1) & (mask > 0)
    cov_all = _covariance(log_prob.float(), advantages, mask)
    cov_all[mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_cov_ratio * mask.sum().item()), 1)
    top_k_idx = torch.nonzero((cov_all < clip_cov_ub) & (cov_all > clip_cov_lb) & (mask > 0))
    if len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx))
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))].to(top_k_idx.device)]
    corr = torch.ones_like(advantages)
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    pg_clipfrac = masked_mean((corr == 0).float(), mask)
    pg_loss = agg_loss(torch.maximum(pg_losses1, pg_losses2) * corr, mask, loss_agg_mode)
    return pg_loss, {"pg_clipfrac": pg_clipfrac.item(), "ppo_kl": ppo_kl.item()}


def kl_cov(log_prob, old_log_prob, advantages, response_mask, loss_agg_mode="token-mean",
           kl_cov_ratio=0.0002, ppo_kl_coef=0.1):
    """verl's compute_policy_loss_kl_cov: the counted tokens copied to the host for a CPU topk."""
    mask = response_mask.float()
    negative_approx_kl, ratio = _log_ratio(log_prob, old_log_prob)
    abs_kl = negative_approx_kl.abs()
    ppo_kl_abs = masked_mean(abs_kl, mask)
    pg_losses = -advantages * ratio
    pg_losses_kl = pg_losses + ppo_kl_coef * abs_kl
    valid = mask > 0
    valid_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    adv = advantages[valid].detach().reshape(-1).cpu()
    logp = log_prob[valid].detach().reshape(-1).float().cpu()
    if len(adv):
        cov = (adv - adv.mean()) * (logp - logp.mean())
        large = torch.topk(cov, max(1, int(len(cov) * kl_cov_ratio)), largest=True).indices
        idx = valid_idx[large.to(valid_idx.device)]
        T = advantages.shape[1]
        pg_losses = pg_losses.clone()
        pg_losses[idx // T, idx % T] = pg_losses_kl[idx // T, idx % T]
    pg_loss = agg_loss(pg_losses, mask, loss_agg_mode)
    return pg_loss, {"ppo_kl": ppo_kl_abs.item()}


EAGER = {fn.__name__: _fp32_advantages(fn)
         for fn in (is_reshape, is_reshape_sign, is_reshape_tr, is_reshape_var, ppo_clip, sapo, vespo, gpg, cispo,
                    dro, dppo, gspo, gmpo, clip_cov, kl_cov)}
