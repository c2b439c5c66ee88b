"""sapo's φ and F (``isreshape_triton/families/sapo.py``)."""
import triton
import triton.language as tl

from ..common import expm1, sech2_half, sigmoid
from . import no_extras


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """τ = τ_pos if A > 0 else τ_neg; φ = A·w·sech²(τ(w−1)/2), F = A·(4/τ)·σ(τ(w−1))
    with w − 1 = expm1(ℓ)."""
    tau_pos, tau_neg = params
    tau = tl.where(A > 0.0, tau_pos, tau_neg)
    x = tau * expm1(ell)
    return A * w * sech2_half(x), A * (4.0 / tau) * sigmoid(x), 1.0 + tl.zeros_like(ell), no_extras(ell)
