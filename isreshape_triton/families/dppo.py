"""dppo: divergence-constrained PPO (DPPO-Binary, verl ``dppo_tv`` / ``dppo_kl``). A token counts
while the step from π_old to π stays within a divergence of its sampled probability in the
direction A pushes it; its gradient weight is the truncated ratio:
loss = −sg(min(w, c))·A·log π·v, φ = min(w, c)·A·v, with p = π, q = π_old and v ∈ {0, 1}:

- ``divergence="tv"``: v = [p − q ≤ δ_high] if A > 0 else [p − q ≥ −δ_low];
- ``divergence="kl"``: D = q·log(q/p) + (1 − q)·log((1 − q + 10⁻⁸)/(1 − p + 10⁻⁸)), the binary
  KL; v = [D ≤ δ_high or p ≤ q] if A > 0 else [D ≤ δ_low or p ≥ q].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..family import Family, KernelFamily, floats
from ..options import Options, check_choice, set_real
from ..reference.shared import TokenTerms, ones_like

DIVERGENCES = ("tv", "kl")  # OPT = the index


@dataclass(frozen=True)
class DPPOParams(Options):
    """v by the total-variation or binary-KL step of the sampled token's probability; the
    ratio truncated at ``clip_ratio_c`` (verl's names: clip_ratio_low/high are δ_low/δ_high)."""

    divergence: str = "tv"
    clip_divergence_low: float = 0.2
    clip_divergence_high: float = 0.2
    clip_ratio_c: float = 20.0

    def __post_init__(self):
        check_choice("divergence", self.divergence, DIVERGENCES)
        set_real(self, "clip_divergence_low", lo=0.0)
        set_real(self, "clip_divergence_high", lo=0.0)
        set_real(self, "clip_ratio_c", lo=0.0, lo_open=True)


def dppo(ell, adv, *, params, lp, olp):
    """φ = min(w, c)·A·v, F = sg(min(w, c))·A·log π·v. Extras: clipfrac (1 − v, verl's
    ``pg_clipfrac``), clipfrac_lower (w > c and v, verl's ``pg_clipfrac_lower``)."""
    p_ = params
    w = torch.exp(ell.detach())
    prob, old = torch.exp(lp.detach()), torch.exp(olp)
    if p_.divergence == "tv":
        up, down = prob - old <= p_.clip_divergence_high, prob - old >= -p_.clip_divergence_low
    else:
        kl = old * (olp - lp.detach()) + (1 - old) * torch.log((1.0 - old + 1e-8) / (1.0 - prob + 1e-8))
        up, down = (kl <= p_.clip_divergence_high) | (prob <= old), (kl <= p_.clip_divergence_low) | (prob >= old)
    v = torch.where(adv > 0, up, down).to(ell.dtype)
    c = torch.clamp(w, max=p_.clip_ratio_c)
    extras = {"clipfrac": 1.0 - v, "clipfrac_lower": (w > p_.clip_ratio_c).to(ell.dtype) * v}
    return TokenTerms(c * adv * v, c * adv * v * lp, ones_like(ell), extras)


def kernel(p) -> KernelFamily:
    """OPT: the divergence's index in DIVERGENCES."""
    return KernelFamily(floats(p.clip_divergence_low, p.clip_divergence_high, p.clip_ratio_c),
                        opt=DIVERGENCES.index(p.divergence))


FAMILY = Family("dppo", DPPOParams, dppo, kernel, extra_metrics=("clipfrac", "clipfrac_lower"), log_probs=True)
