"""The ``@triton.jit`` code of isreshape-triton (installed as ``isreshape_triton.kernels``).

common.py    tile loads, stable moments, accurate expm1/log1p/tanh
families.py  one device function per loss family: (φ, F) per token
gamma.py     γ rules on the device (closed form, exact sample ESS)
layout.py    slot layouts of the record / partial / metric buffers
stats.py     pass 1: sufficient statistics of ℓ per row and per program
loss.py      pass 2: φ, F, gradient and partial sums per program
finalize.py  pass 3: loss, metrics and per-row gradient scale
"""
