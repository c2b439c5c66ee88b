"""kl_cov's selection key, φ and F (``isreshape_triton/families/kl_cov.py``)."""
import triton
import triton.language as tl


@triton.jit
def select(ell, w, A, lp, olp, ctx, params, pos):
    """key = −cov, cov = (A − Ā)·(lp − λ̄) with ctx = (Ā, λ̄) (the largest first; the operations
    of ``selection.covariance``), eligible where it is finite."""
    a_mean, lp_mean = ctx
    cov = (A - a_mean) * (lp - lp_mean)
    return -cov, tl.abs(cov) < float("inf")


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """loss = −A·w + β·|ℓ| at a selected token, else −A·w; φ = A·w − β·sign(ℓ) there; both NaN
    where Ā is (a non-finite token). ctx = (Ā, λ̄, selected). Extras: selected, |ℓ|."""
    coef = params[0]
    a_mean, lp_mean, selected = ctx
    zero = tl.zeros_like(ell)
    penalty = tl.where(selected, coef, 0.0)
    sign = tl.where(ell > 0.0, 1.0, tl.where(ell < 0.0, -1.0, 0.0))
    taint = 0.0 * a_mean  # NaN with the covariance's means (a non-finite token): every token
    F = A * w - penalty * tl.abs(ell) + taint
    phi = A * w - penalty * sign + taint
    return phi, F, 1.0 + zero, (tl.where(selected, 1.0, 0.0).to(ell.dtype), tl.abs(ell), zero, zero, zero)
