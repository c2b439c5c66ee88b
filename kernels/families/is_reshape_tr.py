"""is_reshape_tr's φ and F (``isreshape_triton/families/is_reshape_tr.py``)."""
import triton
import triton.language as tl

from ..common import expm1, sech2_half, sigmoid, tanh
from . import no_extras


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """γ_t = γ_base + (γ_max−γ_base)·σ(−A·ℓ/τ_c);
    φ = [(1−γ_t) + γ_t·w·sech²(τ_h(w−1)/2)]·A, F = A·[(1−γ_t)ℓ + γ_t·(2/τ_h)·tanh(τ_h(w−1)/2)]
    with w − 1 = expm1(ℓ) (accurate near ℓ = 0)."""
    tau_h, tau_c, gamma_base, gamma_max = params
    g = gamma_base + (gamma_max - gamma_base) * sigmoid(-A * ell * (1.0 / tau_c))
    x = tau_h * expm1(ell)
    phi = A * ((1.0 - g) + g * w * sech2_half(x))
    F = A * ((1.0 - g) * ell + g * (2.0 / tau_h) * tanh(0.5 * x))
    return phi, F, g, no_extras(ell)
