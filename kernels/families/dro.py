"""dro's φ and F (``isreshape_triton/families/dro.py``)."""
import triton
import triton.language as tl

from . import no_extras


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """d = log π − log π_old; φ = A − β·d, F = A·log π − ½β·d²."""
    (beta,) = params
    d = lp - olp
    return A - beta * d, A * lp - 0.5 * beta * d * d, 1.0 + tl.zeros_like(ell), no_extras(ell)
