"""is_reshape_sign's φ and F (``isreshape_triton/families/is_reshape_sign.py``)."""
import triton
import triton.language as tl

from ..common import expm1_over, fast_div, log1p, sigmoid

# OPT = NEG_SATURATION + 4 * POS_MICHAELIS_MENTEN (``isreshape_triton/families/is_reshape_sign.py``)
SAT_NONE = tl.constexpr(0)
SAT_SOFT = tl.constexpr(1)
SAT_TRUNCATE = tl.constexpr(2)
SAT_MICHAELIS_MENTEN = tl.constexpr(3)


@triton.jit
def _mm_weight_and_integral(w, tau):
    """b = (1+τ)w/(τ+w) and ∫₁^w b(u)/u du = (1+τ)·ln((τ+w)/(τ+1))."""
    return (1.0 + tau) * fast_div(w, tau + w), (1.0 + tau) * log1p((w - 1.0) * (1.0 / (tau + 1.0)))


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """A>0: w^{γ+}·A (or Michaelis-Menten); A<0: b(w)·A; A=0: 0; ctx = (γ+, γ−).

    F = A·∫₁^w φ/(A·u) du in closed form; the soft saturation is a surrogate φ·ℓ.
    Extras: γ+ on A>0 tokens, γ− on A<0 tokens (per-row γ metrics).
    """
    lam, w_th, trunc_max, mm_tau = params
    gamma_pos, gamma_neg = ctx
    zero = tl.zeros_like(ell)
    g_pos = gamma_pos + zero
    g_neg = gamma_neg + zero
    if OPT // 4 == 1:  # pos_weight = michaelis_menten
        b_pos, f_pos = _mm_weight_and_integral(w, mm_tau)
    else:
        b_pos = tl.exp(g_pos * ell)
        f_pos = expm1_over(ell, g_pos)
    w_neg = tl.exp(g_neg * ell)
    if OPT % 4 == SAT_NONE:
        b_neg = w_neg
        f_neg = expm1_over(ell, g_neg)
    elif OPT % 4 == SAT_SOFT:
        beta = sigmoid(-lam * (w - w_th))
        b_neg = beta * w_neg + (1.0 - beta) * w
        f_neg = b_neg * ell
    elif OPT % 4 == SAT_TRUNCATE:
        b_neg = tl.where(w_neg > trunc_max, trunc_max, w_neg)
        f_sat = (trunc_max - 1.0) / g_neg + trunc_max * (ell - tl.log(trunc_max) / g_neg)
        f_neg = tl.where(w_neg > trunc_max, f_sat, expm1_over(ell, g_neg))
    else:
        b_neg, f_neg = _mm_weight_and_integral(w, mm_tau)
    pos = A > 0.0
    neg = A < 0.0
    phi = tl.where(pos, A * b_pos, tl.where(neg, A * b_neg, A * 0.0))
    F = tl.where(pos, A * f_pos, tl.where(neg, A * f_neg, A * 0.0))
    g_t = tl.where(A >= 0.0, g_pos, g_neg)  # γ+ where A ≥ 0, γ− where A < 0 (and NaN A)
    return phi, F, g_t, (tl.where(pos, g_pos, 0.0), tl.where(neg, g_neg, 0.0), zero, zero, zero)
