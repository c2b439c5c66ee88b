"""ppo_clip's φ and F (``isreshape_triton/families/ppo_clip.py``)."""
import triton
import triton.language as tl

from ..common import clamp_nan, max_nan


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """loss = max(−A·w, −A·clip(w, 1−ε_low, 1+ε_high)); for A<0 with the dual clip
    (OPT = 1) min(that, −A·c). φ = A·w where the unclipped branch is active.
    Extras: clipped, clipped by the dual clip."""
    eps_low, eps_high, dual_c = params
    zero = tl.zeros_like(ell)
    l1 = -A * w
    l2 = -A * clamp_nan(w, 1.0 - eps_low, 1.0 + eps_high)
    loss = max_nan(l1, l2)
    active = (l1 >= l2) | (loss != loss)  # a NaN token keeps its (NaN) gradient
    dual = zero
    if OPT == 1:
        l3 = -A * dual_c
        dual_on = (A < 0.0) & (loss > l3)
        loss = tl.where(dual_on, l3, loss)
        active = active & (~dual_on)
        dual = tl.where(dual_on, 1.0, 0.0).to(ell.dtype)
    phi = tl.where(active, A * w, 0.0)
    clipped = tl.where(l2 > l1, 1.0, 0.0).to(ell.dtype)
    return phi, -loss, 1.0 + zero, (clipped, dual, zero, zero, zero)
