"""ppo_clip's φ and F (``isreshape_triton/families/ppo_clip.py``)."""
import triton
import triton.language as tl

from ..common import clamp_nan, max_nan


@triton.jit
def clipped_surrogate(A, w, eps_low, eps_high, delta, DELTA: tl.constexpr):
    """PPO's clipped surrogate on the ratio w: (loss, l1, l2, w') with w' = min(w, δ) (DELTA, else
    w), l1 = −A·w', l2 = −A·clip(w, 1−ε_low, 1+ε_high) and loss = max(l1, l2) (NaN if either is)."""
    capped = w
    if DELTA:
        capped = tl.where(w > delta, delta, w)
    l1 = -A * capped
    l2 = -A * clamp_nan(w, 1.0 - eps_low, 1.0 + eps_high)
    return max_nan(l1, l2), l1, l2, capped


@triton.jit
def dual_clipped(loss, A, dual_c):
    """The dual clip for A < 0: (min(loss, −A·c), where it is active)."""
    l3 = -A * dual_c
    on = (A < 0.0) & (loss > l3)
    return tl.where(on, l3, loss), on


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """loss = max(−A·w', −A·clip(w, 1−ε_low, 1+ε_high)) with w' = min(w, δ) (DELTA, else w' = w);
    for A<0 with the dual clip (DUAL_CLIP) min(that, −A·c). φ = A·w where the unclipped branch
    is active and w' = w. Extras: clipped, clipped by the dual clip, w' below 1−ε_low with A < 0,
    w' above 1+ε_high with A > 0. OPT = DUAL_CLIP + 2·DELTA."""
    DUAL_CLIP: tl.constexpr = OPT % 2 == 1
    DELTA: tl.constexpr = OPT // 2 == 1
    eps_low, eps_high, dual_c, delta = params
    zero = tl.zeros_like(ell)
    loss, l1, l2, capped = clipped_surrogate(A, w, eps_low, eps_high, delta, DELTA)
    active = (l1 >= l2) | (loss != loss)  # a NaN token keeps its (NaN) gradient
    if DELTA:
        active = active & (capped == w)
    dual = zero
    if DUAL_CLIP:
        loss, dual_on = dual_clipped(loss, A, dual_c)
        active = active & (~dual_on)
        dual = tl.where(dual_on, 1.0, 0.0).to(ell.dtype)
    phi = tl.where(active, A * w, 0.0)
    clipped = tl.where(l2 > l1, 1.0, 0.0).to(ell.dtype)
    low = tl.where((capped < 1.0 - eps_low) & (A < 0.0), 1.0, 0.0).to(ell.dtype)
    high = tl.where((capped > 1.0 + eps_high) & (A > 0.0), 1.0, 0.0).to(ell.dtype)
    return phi, -loss, 1.0 + zero, (clipped, dual, low, high, zero)
