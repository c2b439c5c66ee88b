"""is_reshape_var's φ and F (``isreshape_triton/families/is_reshape_var.py``)."""
import triton
import triton.language as tl

from ..common import clamp_nan, expm1_over, sigmoid


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """Soft four-case γ*(w, A): γ_t = clip(γ_base·(p2+p3) + p4, 0, 1) with p_hi = σ(Tℓ),
    p_pos = σ(T·A); φ = w^{γ_t}·A, F = A·expm1(γ_tℓ)/γ_t; ctx = (γ_base, ·).
    Extras: the case probabilities p1..p4 and γ_base."""
    (temperature,) = params
    gamma_base, _ = ctx
    p_hi = sigmoid(temperature * ell)
    p_lo = sigmoid(-temperature * ell)
    p_pos = sigmoid(temperature * A)
    p_neg = sigmoid(-temperature * A)
    q1 = p_hi * p_pos
    q2 = p_hi * p_neg
    q3 = p_lo * p_pos
    q4 = p_lo * p_neg
    g = clamp_nan(gamma_base * (q2 + q3) + q4, 0.0, 1.0)
    return A * tl.exp(g * ell), A * expm1_over(ell, g), g, (q1, q2, q3, q4, gamma_base + tl.zeros_like(ell))
