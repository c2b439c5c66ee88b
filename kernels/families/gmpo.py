"""gmpo's row term, row ratio, φ and F (``isreshape_triton/families/gmpo.py``)."""
import triton
import triton.language as tl

from ..common import max_nan, min_nan


@triton.jit
def row_term(ell, A, params):
    """(z, A): z = min(ℓ, ε_high) if A > 0, max(ℓ, −ε_low) if A < 0, else 0."""
    eps_low, eps_high = params
    z = tl.where(A > 0.0, min_nan(ell, eps_high), tl.where(A < 0.0, max_nan(ell, -eps_low), 0.0))
    return z, A


@triton.jit
def row_weight(row, clamp, params):
    """ctx = (Ā·r, 0): r = exp(Σ m·z / n), Ā = Σ m·A / n (n ≥ 1)."""
    z_sum, a_sum, n, _ = row
    n = tl.maximum(n, 1.0)
    c = (a_sum / n) * tl.exp(z_sum / n)
    return c, tl.zeros_like(c)


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """F = Ā·r; φ = Ā·r where z = ℓ (the clip passes the gradient). Extras: ℓ outside the clip
    with A > 0, with A < 0."""
    eps_low, eps_high = params
    c, _ = ctx
    zero = tl.zeros_like(ell)
    c = c + zero
    passes = ((A > 0.0) & (ell <= eps_high)) | ((A < 0.0) & (ell >= -eps_low))
    out = (ell < -eps_low) | (ell > eps_high)
    phi = tl.where(passes | (c != c), c, 0.0)
    upper = tl.where(out & (A > 0.0), 1.0, 0.0).to(ell.dtype)
    lower = tl.where(out & (A < 0.0), 1.0, 0.0).to(ell.dtype)
    return phi, c, 1.0 + zero, (upper, lower, zero, zero, zero)
