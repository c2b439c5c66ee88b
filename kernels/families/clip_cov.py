"""clip_cov's selection key, φ and F (``isreshape_triton/families/clip_cov.py``)."""
import triton
import triton.language as tl

from .ppo_clip import clipped_surrogate


@triton.jit
def _mix(x):
    """A bijective 32-bit mix (xorshift-multiply) of uint32 values."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def random_key(seed, pos):
    """The 24-bit key of the token at flat position ``pos`` (as ``families/clip_cov.random_key``)."""
    x = pos.to(tl.uint32) ^ ((seed + tl.zeros(pos.shape, tl.float32)).to(tl.uint32) * 0x2C1B3C6D)
    return _mix(x) >> 8


@triton.jit
def select(ell, w, A, lp, olp, ctx, params, pos):
    """key = the random key of the token's position; eligible: a candidate, one the clip leaves
    alone (ℓ against the log bounds) with lb < cov < ub, cov = (A − Ā)·(lp − λ̄) and ctx = (Ā, λ̄)
    (the operations of ``selection.covariance``)."""
    eps_low, eps_high, log_lo, log_hi, lb, ub, seed = params
    a_mean, lp_mean = ctx
    clipped = ((A > 0.0) & (ell > log_hi)) | ((A < 0.0) & (ell < log_lo))
    cov = (A - a_mean) * (lp - lp_mean)
    return random_key(seed, pos).to(ell.dtype), (~clipped) & (cov > lb) & (cov < ub)


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """PPO's loss max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)) and φ = A·w where the unclipped branch
    is active, both 0 at a selected token and NaN where Ā is (a non-finite token).
    ctx = (Ā, λ̄, selected). Extras: selected, clipped."""
    eps_low, eps_high, log_lo, log_hi, lb, ub, seed = params
    a_mean, lp_mean, selected = ctx
    zero = tl.zeros_like(ell)
    loss, l1, l2, _ = clipped_surrogate(A, w, eps_low, eps_high, 0.0, False)
    active = ((l1 >= l2) | (loss != loss)) & (~selected)  # a NaN token keeps its (NaN) gradient
    taint = 0.0 * a_mean  # NaN with the covariance's means (a non-finite token): every token
    phi = tl.where(active, A * w, 0.0) + taint
    F = tl.where(selected, 0.0, -loss) + taint
    extras = (tl.where(selected, 1.0, 0.0).to(ell.dtype), tl.where(l2 > l1, 1.0, 0.0).to(ell.dtype), zero, zero, zero)
    return phi, F, 1.0 + zero, extras
