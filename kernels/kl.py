"""verl's KL penalty k(x) of x = log π − log π_ref (SPEC §4.1) and its derivative."""
import triton
import triton.language as tl

from .common import clamp_nan

KL_NONE = tl.constexpr(0)
KL_K1 = tl.constexpr(1)  # "kl" / "k1"
KL_ABS = tl.constexpr(2)  # "abs"
KL_K2 = tl.constexpr(3)  # "mse" / "k2"
KL_K3 = tl.constexpr(4)  # "low_var_kl" / "k3"


@triton.jit
def kl_penalty(x, KL_TYPE: tl.constexpr):
    """verl's kl_penalty k(x) of x = log π − log π_ref and dk/dx as torch autograd gives it:
    k1 = x; abs = |x|; k2 = x²/2; k3 = e^{κ} − κ − 1 with κ = clamp(−x, ±20), then clamped
    to [−10, 10] (zero derivative where a clamp is active)."""
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
