"""Every Triton API whose form depends on the Triton version, in one place.

The package supports the Triton that users' CUDA torch builds pin (the window is
``isreshape_triton.versions``: torch 2.9 → 3.5, 2.11 → 3.6, 2.13 → 3.7, 2.14 → 3.8, …); CI
runs the kernels on the oldest and the newest. What differs, and what stands in for it:

* ``approx_div`` — fp32 ``div.approx`` (≤ 2 ulp, no IEEE fix-up): ``tl.math.fdiv(...,
  approx=True)`` from Triton 3.9; before, the same PTX instruction by inline assembly on a
  GPU, and IEEE division under the interpreter (which runs neither; its ``fdiv`` is NumPy's
  division in every version).
* ``ptxas(arch)`` — the ptxas Triton itself compiles with (``get_ptxas`` takes the
  architecture from 3.7 on).
"""
import inspect
import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_APPROX_FDIV = "approx" in inspect.signature(tl.math.fdiv).parameters

if HAS_APPROX_FDIV:

    @triton.jit
    def approx_div(num, den):
        """fp32 num/den by ``div.approx.f32``."""
        return tl.math.fdiv(num, den, approx=True)

elif INTERPRETING:

    @triton.jit
    def approx_div(num, den):
        """fp32 num/den (the interpreter divides in IEEE fp32 whatever is asked)."""
        return num / den

else:

    @triton.jit
    def approx_div(num, den):
        """fp32 num/den by ``div.approx.f32`` (inline PTX: Triton < 3.9 has no ``approx=``)."""
        return tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=f,f,f", [num, den],
                                         dtype=tl.float32, is_pure=True, pack=1)


def ptxas(arch: int = 90):
    """The ptxas tool (``.path``) Triton compiles with for ``sm_<arch>``."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()

