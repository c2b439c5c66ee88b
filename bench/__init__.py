"""Microbenchmark of the fused policy losses against eager PyTorch: ``python -m bench``.

Kept import-free so that ``bench/__main__.py`` can set ``TRITON_INTERPRET=1``
(no CUDA) before anything imports triton or isreshape_triton.
"""
