"""The metrics contract (SPEC §6): names and definitions shared by every path.

All metrics are 0-dim tensors on the input's device (float32, float64 for
float64 inputs). Sums and extrema run over the *counted* tokens (mask ≠ 0);
n is their number. An empty batch gives 0 for every metric except ``gamma*``
batch values, which follow their rule with σ² = 0. Per-row γ values
(``gamma_granularity="sequence"``) are reported as token means over the counted
tokens, 0 when there are none (also for an all-masked batch).

Non-finite tokens (SPEC §11): a non-finite token's φ and per-token extras are
NaN, and so is its ℓ where d is not finite, so every metric that reduces over
a set of counted tokens holding one is NaN (the sign family's
``*_pos``/``*_neg`` only for its own group: a NaN A belongs to neither), as are
the γ values computed from such a set (a fixed γ stays; a row's γ, a statistic
of ℓ, stays finite when only the token's A or rollout weight is bad, and so does
its token mean). ``token_count`` and ``nonfinite_tokens`` are always finite.

common to every family
  token_count     n
  nonfinite_tokens  number of non-finite tokens: counted tokens whose
                  d = log_prob − old_log_prob (compute dtype), A, rollout IS
                  weight or log_prob − ref_log_prob is NaN/±inf
  ppo_kl          Σ(−ℓ)/n
  w_mean, w_max   Σw/n, max w                          (w = exp(ℓ), ℓ clamped)
  phi_mean        Σφ/n                                  (φ includes A)
  phi_abs_max     max |φ|
  sigma_sq        unbiased variance of ℓ (n < 2 → 0)
  ess, ess_ratio  (Σω)²/Σω² and ess/n with ω = w^γ_t, γ_t the token's effective
                  exponent (see below; 1 for ppo_clip, sapo, vespo)
  skewness        m3/m2^1.5 of ℓ, biased moments (scipy.stats.skew), 0 if m2 = 0
                  (any spread: fp32 moments are normalised before the powers)
  kurtosis        m4/m2² − 3 of ℓ, biased (scipy.stats.kurtosis), 0 if m2 = 0
  max_weight_ratio  max w / Σw

effective exponent γ_t, with gamma_mean/gamma_min/gamma_max over counted tokens
  is_reshape       the batch γ (or the row's γ with gamma_granularity="sequence")
  is_reshape_sign  γ+ where A ≥ 0, γ− where A < 0
  is_reshape_tr    γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c)
  is_reshape_var   γ_t = clip(γ_base·(p2+p3) + p4, 0, 1)

family extras
  is_reshape       gamma: the batch γ ("sequence": = gamma_mean)
  is_reshape_sign  gamma_pos, gamma_neg: the batch values ("sequence": token
                   means over the group's counted tokens, 0 when the group is
                   empty); sigma_sq_pos, sigma_sq_neg: variances of ℓ over A>0
                   and A<0 tokens; ess_pos, ess_ratio_pos, ess_neg, ess_ratio_neg:
                  ess and ess/n over the A>0 and A<0 groups
  is_reshape_var   gamma_base: the batch γ_base ("sequence": token mean of the
                   row values); p_case1..p_case4: means of p1..p4
  ppo_clip         clipfrac: mean of [−A·clip(w) > −A·w];
                   clipfrac_lower: mean of [A < 0 and max(−A·w, −A·clip(w)) > −A·c]
                   (0 when clip_ratio_c is None);
                   low_clipped, high_clipped: means of [w' < 1−ε_low and A < 0] and
                   [w' > 1+ε_high and A > 0] (w' = min(w, δ)), TRL's clip ratios
  other families   their ``extra_metrics``, each defined in its module (families/<name>.py)

gamma="psis" (is_reshape, is_reshape_var; is_reshape_sign per group)
  psis_k           Pareto k̂ of the log-weights ℓ (sign: the max over both groups;
                   "sequence": the max over rows), 0 when too few tokens to fit
  psis_unreliable  1.0 if k̂ > 0.7 anywhere (γ fell back to gamma_fallback), else 0.0

with ref_log_prob (SPEC §4.1)
  kl_loss          agg(k_t) of verl's kl_penalty (without kl_coef), the loss's own aggregation

with rollout_log_prob (``RolloutCorrection``), over the n₀ tokens the mask counts before the
correction's rejection (the others above count after it), with ρ = π_old/π_rollout (or π/π_rollout)
  rollout_is_mean             Σ r/n₀, the applied rollout IS weight
  rollout_is_fraction_high    fraction with ρ > weight_max (the sequence ratio: of the rows)
  rollout_is_fraction_low     fraction with ρ < weight_min (1/weight_max when it is None, as verl)
  rollout_rs_masked_fraction  fraction rejected
  rollout_kl                  mean of −x = log π_rollout − log π_old (or − log π), unclamped: the
                              k1 estimate of KL(π_rollout ‖ π_old), OpenRLHF's vllm_kl, verl's kl
"""
from __future__ import annotations

from .families import FAMILIES

COMMON = ("token_count", "nonfinite_tokens", "ppo_kl", "w_mean", "w_max", "phi_mean", "phi_abs_max",
          "sigma_sq", "ess", "ess_ratio", "skewness", "kurtosis", "max_weight_ratio")
GAMMA_STATS = ("gamma_mean", "gamma_min", "gamma_max")
EXTRAS = {name: (GAMMA_STATS if family.gamma_stats else ()) + family.metrics + family.extra_metrics
          for name, family in FAMILIES.items()}
PSIS = ("psis_k", "psis_unreliable")
KL = ("kl_loss",)
ROLLOUT = ("rollout_is_mean", "rollout_is_fraction_high", "rollout_is_fraction_low", "rollout_rs_masked_fraction",
           "rollout_kl")


def metric_names(loss_type: str, params=None, kl: bool = False, rollout: bool = False) -> tuple:
    """The metric keys every path returns for ``loss_type`` (and its params), in a fixed order;
    ``kl``: a ``ref_log_prob`` was given (kl_loss = agg(k_t), without β); ``rollout``: a rollout
    correction (``rollout_log_prob``)."""
    psis = params is not None and getattr(params, "gamma", None) == "psis"
    return COMMON + EXTRAS[loss_type] + (PSIS if psis else ()) + (KL if kl else ()) + (ROLLOUT if rollout else ())
