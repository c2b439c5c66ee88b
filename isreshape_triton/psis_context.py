"""The γ context of ``gamma="psis"`` (Pareto-smoothed IS), computed on the device before the
loss pass: torch ops (sorting and the generalized-Pareto fit are not kernel work), no host sync
on one process; the loss kernel reads it as its given context (``GAMMA_GIVEN``).
"""
from __future__ import annotations

import math

import torch

from .family import KernelFamily
from .inputs import Inputs, pad_packed, per_token_advantages
from .launch import acc_dtype
from .psis import K_HAT_THRESHOLD, psis_gamma


def _gather_rows(tensors, process_group) -> list:
    """Each [R, T] tensor's rows from every rank, padded to the largest R and T (False or
    0), concatenated in rank order (identical on every rank). One host sync: the shapes."""
    world = torch.distributed.get_world_size(process_group)
    shape = torch.tensor(tensors[0].shape, device=tensors[0].device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape, group=process_group)
    R, T = (int(v) for v in torch.stack(shapes).amax(0).tolist())
    gathered = []
    for t in tensors:
        padded = t.new_zeros((R, T))
        padded[: t.shape[0], : t.shape[1]] = t
        out = t.new_empty((world * R, T))
        torch.distributed.all_gather_into_tensor(out, padded, group=process_group)
        gathered.append(out)
    return gathered


def _psis_rows(x: Inputs, per_row: bool) -> Inputs:
    """[R, T] inputs for PSIS: padded as they are; packed as one row for a batch γ, or padded
    to [S, longest] for per-sequence γ (one sync: the longest length)."""
    if not x.packed:
        return x
    if per_row:
        longest = int((x.cu_seqlens[1:] - x.cu_seqlens[:-1]).max()) if x.rows else 0
        return pad_packed(x, longest)
    adv = None if x.advantages is None else per_token_advantages(x)
    one_row = [None if t is None else t.reshape(1, -1)
               for t in (x.log_prob, x.old_log_prob, adv, x.response_mask)]
    return Inputs(*one_row, x.shape)


def psis_context(x: Inputs, params, fam: KernelFamily, clamp: float, process_group=None):
    """(c0, c1) per batch ([2]) or per row ([R, 2]) from Pareto-smoothed IS, and the
    psis_k / psis_unreliable metrics: torch ops on the device (sorting and the
    generalized-Pareto fit are not kernel work), no host sync on one process. A group
    whose γ is fixed is not fitted (k̂ = 0). With ``process_group`` and one γ per batch,
    the fit runs on the gathered ℓ of all ranks (PSIS needs the tail of the global
    sample), so every rank computes the same γ; this costs one sync (the ranks' shapes).
    """
    per_row = fam.per_row
    x = _psis_rows(x, per_row)
    acc = acc_dtype(x.log_prob.dtype)
    counted = (torch.ones_like(x.log_prob, dtype=torch.bool) if x.response_mask is None
               else x.response_mask != 0)
    diff = x.log_prob.detach().to(acc) - x.old_log_prob.to(acc)
    bound = diff.new_ones(()) * clamp  # a tensor: a symbolic clamp stays symbolic under torch.compile
    ell = torch.where(counted, torch.where(torch.isfinite(diff), diff, math.nan), 0.0)
    ell = torch.minimum(torch.maximum(ell, -bound), bound)
    dims = (1,) if per_row else (0, 1)
    sign = fam.sign_groups
    if sign:
        adv = x.advantages.to(acc) if x.advantages is not None else torch.ones_like(ell)
        adv = torch.where(torch.isfinite(adv), adv, math.nan)  # a non-finite A is in neither group (SPEC §11)
        groups = [counted & (adv > 0), counted & (adv < 0)]
    else:
        groups = [counted]
    if process_group is not None and not per_row:
        ell, *groups = _gather_rows([ell, *groups], process_group)
    lo_hi = (fam.gamma_rule.range_a, fam.gamma_rule.range_b)
    finite = torch.where(ell.isnan(), 0.0, ell)

    def fit(grp, lo, hi):  # a group holding a non-finite ℓ: NaN γ and k̂ (SPEC §11)
        g, k = psis_gamma(finite, grp, rho_min=params.rho_min, lo=lo, hi=hi, fallback=params.gamma_fallback,
                          per_row=per_row)
        tainted = (grp & ell.isnan()).any(dim=dims)
        return torch.where(tainted, math.nan, g), torch.where(tainted, math.nan, k)

    fits = [fit(grp, lo, hi) for grp, (lo, hi) in zip(groups, lo_hi)]
    if sign:
        (g_pos, k_pos), (d_neg, k_neg) = fits
        c0 = torch.where(groups[0].sum(dims) > 0, g_pos.to(acc), 0.5)
        c1 = torch.where(groups[1].sum(dims) > 0, 1.0 + d_neg.to(acc), 1.5)
        if params.gamma_pos is not None:
            c0, k_pos = torch.full_like(c0, params.gamma_pos), torch.zeros_like(k_pos)
        if params.gamma_neg is not None:
            c1, k_neg = torch.full_like(c1, params.gamma_neg), torch.zeros_like(k_neg)
        k_hat = torch.maximum(k_pos, k_neg)
    else:
        (g, k_hat), = fits
        c0 = g.to(acc)
        c1 = torch.zeros_like(c0)
    k_hat = k_hat.to(acc)
    extra = {"psis_k": k_hat.amax() if k_hat.numel() else k_hat.new_zeros(()),
             "psis_unreliable": torch.where(k_hat.isnan().any(), math.nan, (k_hat > K_HAT_THRESHOLD).any().to(acc))}
    return torch.stack([c0, c1], dim=-1).contiguous(), extra
