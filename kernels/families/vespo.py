"""vespo's φ and F and its row weight (``isreshape_triton/families/vespo.py``)."""
import triton
import triton.language as tl

from ..common import clamp_nan
from . import no_extras


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """φ = φ(W_b)·A with the row's sequence weight ctx = (φ(W_b), ·); surrogate F = φ·ℓ."""
    seq_weight, _ = ctx
    phi = seq_weight * A
    return phi, phi * ell, 1.0 + tl.zeros_like(ell), no_extras(ell)


@triton.jit
def row_weight(row, clamp, params):
    """ctx = (φ(W), 0): φ(W) = W^k·exp(λ(1−W)), log W = clamp(Σ m·ℓ, ±clamp); (k, λ) = (k_pos,
    λ_pos) if the row's first counted advantage is ≥ 0 else (k_neg, λ_neg); NaN if that advantage
    is not finite (its sign is unknown: SPEC §11)."""
    k_pos, lambda_pos, k_neg, lambda_neg = params
    log_w_sum, _, _, a_first = row
    log_w = clamp_nan(log_w_sum, -clamp, clamp)
    k = tl.where(a_first >= 0.0, k_pos, k_neg)
    lam = tl.where(a_first >= 0.0, lambda_pos, lambda_neg)
    phi = tl.exp(k * log_w + lam * (1.0 - tl.exp(log_w)))
    return tl.where(tl.abs(a_first) < float("inf"), phi, float("nan")), tl.zeros_like(phi)
