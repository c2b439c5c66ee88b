"""Slot layouts of the small buffers the kernels exchange (one place, read by the
kernels as constexprs and by Python through ``.value``).

Statistics record (``batch_stats_kernel`` → ``token_loss_kernel``), one per
program (batch γ) or one per piece (row rules, see ``rows.py``): (count, mean, M2)
of ℓ for the groups all / A>0 / A<0, the piece's Σ m·ℓ and first counted
advantage (VESPO), then for ``gamma="ess_exact"`` the grid sums Σe^{γ_jℓ},
Σe^{2γ_jℓ}, Σℓe^{γ_jℓ}, Σℓe^{2γ_jℓ} of group a (all or A>0) and group b (A<0),
G values each.

Row-sum element (``token_loss_kernel``, seq-* aggregation): two per chunk, the
chunk's head and tail piece (``rows.py``): (count, Σ m·L, Σ m·k, row, flags) with flags
ROW_STARTS (a tail: its row starts here) and ROW_ENDS (a head whose row ends here).

Partial record (one per program of ``token_loss_kernel``, merged by the last one).
Metric vector (the op's output): ``METRIC_SLOTS`` below.
"""
import triton.language as tl

# statistics record
S_N_ALL = tl.constexpr(0)
S_N_POS = tl.constexpr(3)
S_N_NEG = tl.constexpr(6)
S_LSUM = tl.constexpr(9)
S_AFIRST = tl.constexpr(10)
S_GRID = tl.constexpr(11)  # + k*G + j; k = 0..3 group a, 4..7 group b
S_BASE_WIDTH = 11

# row-sum element
E_COUNT = tl.constexpr(0)
E_LOSS = tl.constexpr(1)
E_KL = tl.constexpr(2)
E_ROW = tl.constexpr(3)
E_FLAGS = tl.constexpr(4)
ELEMENT_WIDTH = tl.constexpr(5)
ROW_STARTS = tl.constexpr(1)
ROW_ENDS = tl.constexpr(2)

# partial record: five stacks of 8 slots (``finalize.merge_record``); moments, maxima and
# exponential sums as (count, mean, M2..) / max / Σ about the program's own mean and max
P_COUNTS = tl.constexpr(0)  # (count, mean) of ℓ: all +0, A>0 +2, A<0 +4
P_SEQ_LOSS = tl.constexpr(6)  # Σ over complete rows of (Σ_t m·L)/n_b
P_SEQ_KL = tl.constexpr(7)  # Σ over complete rows of (Σ_t m·k)/n_b
P_MAXIMA = tl.constexpr(8)  # max w, max |φ|, max γ_t, −min γ_t, max z of ESS all / A>0 / A<0, unused
P_CENTRAL = tl.constexpr(16)  # M2, M3, M4 of all, M2 of A>0, M2 of A<0
P_ESS = tl.constexpr(21)  # (Σe^{z−max}, Σe^{2(z−max)}), z = γ_t·ℓ: all +0, A>0 +2, A<0 +4
P_LOSS = tl.constexpr(27)  # Σ m·L
P_KL = tl.constexpr(28)  # Σ m·k of the KL term
P_W = tl.constexpr(29)
P_PHI = tl.constexpr(30)
P_GAMMA = tl.constexpr(31)  # Σγ_t
P_EXTRAS = tl.constexpr(32)  # + k, k = 0..4: the family's extra per-token terms
P_NONFINITE = tl.constexpr(37)
P_ROWS = tl.constexpr(38)  # complete rows with n_b > 0
PARTIAL_WIDTH = tl.constexpr(40)

METRIC_SLOTS = (
    "token_count", "ppo_kl", "w_mean", "w_max", "phi_mean", "phi_abs_max", "sigma_sq",
    "ess", "ess_ratio", "gamma_mean", "gamma_min", "gamma_max", "gamma", "gamma_pos",
    "gamma_neg", "sigma_sq_pos", "sigma_sq_neg", "gamma_base", "p_case1", "p_case2",
    "p_case3", "p_case4", "clipfrac", "clipfrac_lower", "skewness", "kurtosis",
    "max_weight_ratio", "ess_pos", "ess_ratio_pos", "ess_neg", "ess_ratio_neg",
    "nonfinite_tokens", "kl_loss",
)
METRIC_WIDTH = tl.constexpr(33)
