"""is_reshape's φ and F (``isreshape_triton/families/is_reshape.py``)."""
import triton
import triton.language as tl

from ..common import expm1_over
from . import no_extras


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """φ = w^γ·A, F = A·expm1(γℓ)/γ; ctx = (γ, ·)."""
    gamma, _ = ctx
    g = gamma + tl.zeros_like(ell)
    return A * tl.exp(g * ell), A * expm1_over(ell, g), g, no_extras(ell)
