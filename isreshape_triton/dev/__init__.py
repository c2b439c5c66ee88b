"""Development tooling, outside the product's import path: nothing under ``isreshape_triton``
but this subpackage imports it; the tests and ``bench/`` do.

aot.py          sm_90 ahead-of-time compilation of every kernel specialization, the resource
                report and the SASS (``python -m isreshape_triton.dev.aot``)
profiling.py    machine-independent work counters: aten ops, Triton launches, bytes, syncs
interpreter.py  Triton's interpreter (``TRITON_INTERPRET=1``) with whole-level custom
                reductions and the GPU's fp32 → bf16 rounding (``install()``)
"""
