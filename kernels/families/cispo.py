"""cispo's φ and F (``isreshape_triton/families/cispo.py``)."""
import triton
import triton.language as tl

from ..common import clamp_nan


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """c = clip(w, lo, hi); φ = c·A, F = c·A·log π. Extras: c ≠ w, w > hi with A > 0."""
    lo, hi = params
    zero = tl.zeros_like(ell)
    c = clamp_nan(w, lo, hi)
    phi = c * A
    clipped = tl.where(c != w, 1.0, 0.0).to(ell.dtype)
    upper = tl.where((w > hi) & (A > 0.0), 1.0, 0.0).to(ell.dtype)
    return phi, phi * lp, 1.0 + zero, (clipped, upper, zero, zero, zero)
