"""verl's KL penalty k(x) of x = log π − log π_ref (SPEC §4.1), its derivative, and the
gradient and off-policy variants of verl, TRL and OpenRLHF. KL_TYPE = the type (bits 0-2,
``params.KL_TYPES``) + KL_STRAIGHT_THROUGH + 16·(the correction's index in
``params.KL_CORRECTIONS``)."""
import triton
import triton.language as tl

from .common import clamp_nan

KL_NONE = tl.constexpr(0)
KL_K1 = tl.constexpr(1)  # "kl" / "k1"
KL_ABS = tl.constexpr(2)  # "abs"
KL_K2 = tl.constexpr(3)  # "mse" / "k2"
KL_K3 = tl.constexpr(4)  # "low_var_kl" / "k3"
KL_STRAIGHT_THROUGH = tl.constexpr(8)  # "k3+", ...: verl's straight-through gradient of k2
KL_RATIO = tl.constexpr(1)  # correction 1: k·w (TRL's use_bias_correction_kl)
KL_UNBIASED = tl.constexpr(2)  # correction 2: the gradient min(w, 10)·x (OpenRLHF's unbiased_gradient)
KL_IS_WEIGHT_MAX = tl.constexpr(10.0)  # OpenRLHF's KL_IS_WEIGHT_CLIP


@triton.jit
def kl_penalty(x, w, KL_TYPE: tl.constexpr):
    """The KL term k_t and ∂k_t/∂lp_t of x = log π − log π_ref, w = exp(ℓ): verl's kl_penalty as
    torch autograd gives it, k1 = x; abs = |x|; k2 = x²/2; k3 = e^{κ} − κ − 1 with κ = clamp(−x,
    ±20), then clamped to [−10, 10] (zero derivative where a clamp is active); then the
    straight-through gradient x of "+" types, or a correction: k·w with the gradient (k' + k)·w,
    or the gradient min(w, 10)·x (with k NaN where w is, as the straight-through k + s − sg(s) of
    OpenRLHF and the reference)."""
    BASE: tl.constexpr = KL_TYPE % 8
    CORRECTION: tl.constexpr = KL_TYPE // 16
    k, dk = _kl_penalty(x, BASE)
    if KL_TYPE % 16 >= KL_STRAIGHT_THROUGH:
        dk = x
    if CORRECTION == KL_RATIO:
        dk = (dk + k) * w
        k = k * w
    elif CORRECTION == KL_UNBIASED:
        dk = tl.where(w > KL_IS_WEIGHT_MAX, KL_IS_WEIGHT_MAX, w) * x
        k = tl.where(w == w, k, w)
    return k, dk


@triton.jit
def _kl_penalty(x, KL_TYPE: tl.constexpr):
    """verl's kl_penalty k(x) and dk/dx (see ``kl_penalty``)."""
    if KL_TYPE == KL_K1:
        k = x
        dk = tl.zeros_like(x) + 1.0
    elif KL_TYPE == KL_ABS:
        k = tl.abs(x)
        dk = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0 * x))
    elif KL_TYPE == KL_K2:
        k = 0.5 * x * x
        dk = x
    else:
        kappa = clamp_nan(-x, -20.0, 20.0)
        e = tl.exp(kappa)
        k3 = e - kappa - 1.0
        k = clamp_nan(k3, -10.0, 10.0)
        dk = tl.where((tl.abs(x) > 20.0) | (k3 > 10.0) | (k3 < -10.0), 0.0 * x, 1.0 - e)
    return k, dk
