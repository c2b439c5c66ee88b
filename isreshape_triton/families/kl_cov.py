"""kl_cov: KL-Cov (verl ``kl_cov``, "The Entropy Mechanism of RL for Reasoning LMs"). The policy
gradient loss −A·w, plus a penalty β·|ℓ| on the k = max(1, ⌊n·kl_cov_ratio⌋) counted tokens of
largest covariance cov_t = (A_t − Ā)·(log π_t − mean log π) (``isreshape_triton/selection.py``):

    loss_t = −A·w + β·|ℓ|·[t selected],   φ = A·w − β·sign(ℓ)·[t selected].

Ties in cov go to the first tokens by position (verl's topk: any of them). The selection runs on
the device before the loss pass (a sort), over the tokens of this call (verl's micro-batch).
Rollout IS weights scale each token, as verl.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import covariance, first_by_position, selection_count
from ..family import Family, KernelFamily, floats
from ..options import Options, set_real
from ..reference.shared import TokenTerms, ones_like


@dataclass(frozen=True)
class KLCovParams(Options):
    """β = ppo_kl_coef on the kl_cov_ratio fraction of tokens of largest covariance (verl's defaults)."""

    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1

    def __post_init__(self):
        set_real(self, "kl_cov_ratio", lo=0.0, hi=1.0, lo_open=True)
        set_real(self, "ppo_kl_coef", lo=0.0)


def stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None, *, lp, position):
    """``selected``: the k = max(1, ⌊n·kl_cov_ratio⌋) tokens of largest cov (first by position among
    equals), n the counted tokens; ``taint``: 0, or NaN with the covariance's means."""
    cov, _, taint = covariance(lp, ell, adv, mask)
    k = selection_count(mask.sum(), p.kl_cov_ratio)
    return {"selected": first_by_position(-cov, mask & torch.isfinite(cov), k), "taint": taint}


def kl_cov(ell, adv, *, selected, taint, params, lp, olp):
    """F = A·w − β·|ℓ|·s (s: selected), φ = A·w − β·sign(ℓ)·s; both NaN where the covariance's
    means are (``taint``: 0 or NaN). Extras: cov_selected (s) and kl_abs (|ℓ|, the mean verl reports
    as ``ppo_kl``)."""
    s = selected.to(ell.dtype)
    w = torch.exp(ell)
    F = adv * w - params.ppo_kl_coef * s * ell.abs() + taint * ell
    phi = adv * w.detach() - params.ppo_kl_coef * s * torch.sign(ell.detach()) + taint
    return TokenTerms(phi, F, ones_like(ell), {"cov_selected": s, "kl_abs": ell.detach().abs()})


def kernel(p) -> KernelFamily:
    return KernelFamily(floats(p.ppo_kl_coef), gamma_mode="given",
                        select_ratio=p.kl_cov_ratio)


FAMILY = Family("kl_cov", KLCovParams, kl_cov, kernel, stats=stats, extra_metrics=("cov_selected", "kl_abs"),
                log_probs=True)
