"""The families' device functions, one module per family (the contract: ``isreshape_triton/family.py``):

    token(ell, w, A, lp, olp, ctx, params, OPT) -> (phi, F, gamma_t, extras)

and, for a family whose context is a per-row weight, ``row_weight(log_w_sum, n, a_first, clamp,
params) -> ctx`` of the row's Σ m·ℓ, its token count and its first counted advantage. The kernels take them as constexprs (``TOKEN``, ``ROW_WEIGHT``), so the shared
kernel code never names a family.
"""
import triton
import triton.language as tl


@triton.jit
def no_extras(ell):
    """No extra per-token terms (five zeros)."""
    zero = tl.zeros_like(ell)
    return zero, zero, zero, zero, zero
