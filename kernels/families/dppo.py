"""dppo's φ and F (``isreshape_triton/families/dppo.py``)."""
import triton
import triton.language as tl

DIVERGENCE_KL = tl.constexpr(1)  # OPT (``isreshape_triton/families/dppo.py``: DIVERGENCES)


@triton.jit
def token(ell, w, A, lp, olp, ctx, params, OPT: tl.constexpr):
    """v by the TV (OPT = 0) or binary-KL (OPT = 1) step from q = π_old to p = π (the side A
    pushes); φ = min(w, c)·A·v, F = φ·log π. Extras: 1 − v, [w > c]·v."""
    delta_low, delta_high, c = params
    zero = tl.zeros_like(ell)
    p = tl.exp(lp)
    q = tl.exp(olp)
    if OPT == DIVERGENCE_KL:
        kl = q * (olp - lp) + (1.0 - q) * tl.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
        up = (kl <= delta_high) | (p <= q)
        down = (kl <= delta_low) | (p >= q)
    else:
        up = p - q <= delta_high
        down = p - q >= -delta_low
    v = tl.where(tl.where(A > 0.0, up, down), 1.0, 0.0).to(ell.dtype)
    phi = tl.where(w > c, c, w) * A * v
    return phi, phi * lp, 1.0 + zero, (1.0 - v, tl.where(w > c, v, 0.0), zero, zero, zero)
