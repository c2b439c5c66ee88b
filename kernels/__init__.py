"""The ``@triton.jit`` code of isreshape-triton (installed as ``isreshape_triton.kernels``).

rows.py      work items: chunks, the row pieces inside them, tile loads
common.py    lane accumulators (moments, shifted exp sums), NaN-loud helpers, expm1/log1p/tanh
families/    one module per loss family: its token function (φ, F) and, if any, its row weight
kl.py        verl's KL penalty
gamma.py     γ rules on the device (closed form, exact sample ESS), record merges
layout.py    slot layouts of the record / element / partial / metric buffers
stats.py     forward pass 1: statistics records of ℓ per program or per row piece
loss.py      forward pass 2: φ, F, ∂L/∂log_prob, lane-accumulated partials; the last program finalizes
finalize.py  the last program's merge: loss, metrics, gradient scale
backward.py  the backward: ∂L/∂log_prob · scale · grad_out
logits.py    from logits: online log-softmax, entropy and their backward (SPEC §8)
sampling.py  the optimal sampling distribution of seed 003 (SPEC §9)
"""
