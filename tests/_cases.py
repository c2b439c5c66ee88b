"""Shared test inputs: the option configurations of every family, a pairwise
covering-array generator, and a synthetic batch builder with the awkward cases
(empty rows, log-ratios beyond ±20, NaN in masked positions, strided views)."""
from __future__ import annotations

import itertools

import torch

# (loss_type, options): every family, saturation, positive weight, γ mode and granularity
FAMILY_CONFIGS = [
    ("is_reshape", {}),
    ("is_reshape", {"gamma": 0.7}),
    ("is_reshape", {"gamma": 0.0, "gamma_min": 0.0}),
    ("is_reshape", {"gamma": "ess_exact"}),
    ("is_reshape", {"gamma_granularity": "sequence"}),
    ("is_reshape", {"gamma": "ess_exact", "gamma_granularity": "sequence", "rho_min": 0.5}),
    ("is_reshape", {"gamma": "psis"}),
    ("is_reshape", {"gamma": "psis", "gamma_granularity": "sequence"}),
    ("is_reshape_sign", {}),
    ("is_reshape_sign", {"neg_saturation": "none"}),
    ("is_reshape_sign", {"neg_saturation": "truncate", "truncate_max": 2.0}),
    ("is_reshape_sign", {"neg_saturation": "michaelis_menten", "mm_tau": 0.5}),
    ("is_reshape_sign", {"pos_weight": "michaelis_menten"}),
    ("is_reshape_sign", {"pos_weight": "michaelis_menten", "neg_saturation": "truncate"}),
    ("is_reshape_sign", {"gamma": "ess_exact"}),
    ("is_reshape_sign", {"gamma_granularity": "sequence", "neg_saturation": "none"}),
    ("is_reshape_sign", {"gamma_pos": 0.4, "gamma_neg": 1.3}),
    ("is_reshape_sign", {"gamma_pos": 0.6}),
    ("is_reshape_sign", {"gamma": "psis", "gamma_neg": 1.2}),
    ("is_reshape_sign", {"gamma": "psis", "gamma_granularity": "sequence"}),
    ("is_reshape_tr", {}),
    ("is_reshape_tr", {"tau_h": 2.0, "tau_c": 0.5, "gamma_base": 0.2, "gamma_max": 0.8}),
    ("is_reshape_var", {}),
    ("is_reshape_var", {"gamma": "ess_exact"}),
    ("is_reshape_var", {"gamma_granularity": "sequence", "temperature": 2.0}),
    ("is_reshape_var", {"gamma": 0.5}),
    ("is_reshape_var", {"gamma": "psis", "gamma_min": 0.1}),
    ("ppo_clip", {}),
    ("ppo_clip", {"clip_ratio_c": None, "clip_ratio_high": 0.28}),
    ("sapo", {}),
    ("sapo", {"tau_pos": 2.0, "tau_neg": 0.5}),
    ("vespo", {}),
    ("gpg", {}),
    ("cispo", {"clip_ratio_low": None, "clip_ratio_high": 0.5}),
    ("dro", {"beta": 0.3}),
    ("dppo", {"divergence": "kl", "clip_divergence_low": 0.05, "clip_divergence_high": 0.1, "clip_ratio_c": 1.5}),
    ("ppo_clip", {"delta": 1.3, "clip_ratio_high": 0.28}),
    ("gspo", {"clip_ratio_low": 0.05, "clip_ratio_high": 0.08, "log_ratio_max": 0.3}),
    ("gmpo", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15}),
    ("gspo", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.1, "delta": 1.05, "clip_ratio_c": 1.02}),
    ("kl_cov", {"kl_cov_ratio": 0.05, "ppo_kl_coef": 0.5}),
    ("clip_cov", {"clip_cov_ratio": 0.05, "clip_cov_lb": 0.05, "seed": 3}),
]


def refused_correction(loss_type, opts, correction) -> bool:
    """A rollout correction the op does not compute with this family (a sequence rejection with
    batch statistics, a sequence weight with VESPO's row weight: ``check_correction_family``)."""
    from isreshape_triton import make_params
    from isreshape_triton.params import RolloutCorrection, check_correction_family

    try:
        check_correction_family(RolloutCorrection(**correction), loss_type, make_params(loss_type, **opts))
    except NotImplementedError:
        return True
    return False


def sampled(step: int) -> list:
    """Every ``step``-th configuration, and the first one of every family."""
    seen = set()
    out = []
    for i, (loss_type, opts) in enumerate(FAMILY_CONFIGS):
        if i % step == 0 or loss_type not in seen:
            out.append((loss_type, opts))
        seen.add(loss_type)
    return out


AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ADVANTAGES = ("BT", "B", "none")
MASKS = ("bool", "int", "float", "none")
LAYOUTS = ("contiguous", "strided")
SPECIALS = ("plain", "empty_rows", "extreme", "nan_masked")


def pairwise(axes: dict) -> list:
    """A covering array: every pair of values of any two axes appears in some case
    (greedy, deterministic). Returns a list of {axis: value-index} dicts."""
    names = list(axes)
    sizes = [len(axes[n]) for n in names]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(names)), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}
    cases = []
    while uncovered:
        i, a, j, b = min(uncovered)
        case = {i: a, j: b}
        for k in range(len(names)):
            if k in case:
                continue
            case[k] = max(range(sizes[k]), key=lambda v: sum(
                ((min(k, q), v if k < q else case[q], max(k, q), case[q] if k < q else v) in uncovered)
                for q in case))
        uncovered -= {(p, case[p], q, case[q]) for p, q in itertools.combinations(range(len(names)), 2)}
        cases.append({names[k]: axes[names[k]][case[k]] for k in range(len(names))})
    return cases


def make_batch(B: int, T: int, dtype=torch.float32, adv="BT", mask="bool", layout="contiguous",
               special="plain", seed: int = 0, spread: float = 0.5):
    """(log_prob, old_log_prob, advantages, response_mask) with the requested quirks."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3.0
    olp = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages[torch.rand(B, T, generator=g) < 0.1] = 0.0
    keep = torch.rand(B, T, generator=g) > 0.25
    if special == "empty_rows" and B > 1:
        keep[1] = False
        keep[-1, : T // 2] = False
    if special == "extreme":
        big = torch.rand(B, T, generator=g) < 0.2
        olp = torch.where(big, lp + torch.where(torch.rand(B, T, generator=g) < 0.5, 25.0, -23.0), olp)
    if mask == "none":
        keep = torch.ones(B, T, dtype=torch.bool)
    if special == "nan_masked" and mask != "none":
        lp = torch.where(keep, lp, float("nan"))
        olp = torch.where(keep, olp, float("inf"))
        advantages = torch.where(keep, advantages, float("-inf"))
    row_adv = torch.randn(B, generator=g, dtype=torch.float64)

    def cast(t):
        t = t.to(dtype)
        if layout == "strided":  # a non-contiguous view with the same values
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype)
            wide[..., ::2] = t
            t = wide[..., ::2]
        return t

    advantages = {"BT": cast(advantages), "B": row_adv.to(dtype), "none": None}[adv]
    response_mask = {"bool": keep, "int": keep.to(torch.int32), "float": keep.to(torch.float32),
                     "none": None}[mask]
    if response_mask is not None and layout == "strided":
        response_mask = response_mask.t().contiguous().t()  # column-major view
    return cast(lp), cast(olp), advantages, response_mask
