"""gspo's row ratio, φ and F (``isreshape_triton/families/gspo.py``)."""
import triton
import triton.language as tl

from ..common import min_nan
from .ppo_clip import clipped_surrogate, dual_clipped


@triton.jit
def row_weight(row, clamp, params):
    """ctx = (s, g): log s = Σ m·ℓ / max(n, 1), s = exp(min(log s, log_ratio_max)); g = 0 where
    the clamp cuts the gradient (log s > log_ratio_max), else 1."""
    eps_low, eps_high, log_max, delta, dual_c = params
    log_w_sum, _, n, _ = row
    log_s = log_w_sum / tl.maximum(n, 1.0)
    return tl.exp(min_nan(log_s, log_max)), tl.where(log_s > log_max, 0.0, 1.0)


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """loss = max(−A·s', −A·clip(s, 1−ε_low, 1+ε_high)), s' = min(s, δ) (DELTA) or s; for A<0
    with the dual clip (DUAL_CLIP) min(that, −A·c). φ = A·s·g where the unclipped branch is
    active and s' = s. Extras: the clipped branch is larger; the dual clip is active.
    OPT = DELTA + 2·DUAL_CLIP."""
    DELTA: tl.constexpr = OPT % 2 == 1
    DUAL_CLIP: tl.constexpr = OPT // 2 == 1
    eps_low, eps_high, log_max, delta, dual_c = params
    s, g = ctx
    zero = tl.zeros_like(ell)
    s = s + zero
    loss, l1, l2, capped = clipped_surrogate(A, s, eps_low, eps_high, delta, DELTA)
    active = ((l1 >= l2) & (capped == s)) | (s != s)  # a NaN ratio keeps its (NaN) gradient
    dual = zero
    if DUAL_CLIP:
        loss, dual_on = dual_clipped(loss, A, dual_c)
        active = active & (~dual_on)
        dual = tl.where(dual_on, 1.0, 0.0).to(ell.dtype)
    phi = tl.where(active, A * s * g, 0.0)
    clipped = tl.where(l2 > l1, 1.0, 0.0).to(ell.dtype)
    return phi, -loss, 1.0 + zero, (clipped, dual, zero, zero, zero)
