"""The families' device functions, one module per family (the contract: ``isreshape_triton/family.py``):

    token(ell, w, A, lp, olp, ctx, params, OPT) -> (phi, F, gamma_t, extras)

and, for a family whose context is a per-row weight, ``row_weight(row, clamp, params) -> ctx`` of
the row's sums row = (Σ m·z, Σ m·a, Σ m, its first counted advantage), where z = ℓ, or (z, a) =
``row_term(ell, A, params)`` for a family that defines it (pass 1 sums it per token). The kernels
take them as constexprs (``TOKEN``, ``ROW_WEIGHT``, ``ROW_TERM``), so the shared kernel code never
names a family.
"""
import triton
import triton.language as tl


@triton.jit
def no_extras(ell):
    """No extra per-token terms (five zeros)."""
    zero = tl.zeros_like(ell)
    return zero, zero, zero, zero, zero
