"""Slot layouts of the small buffers the kernels exchange (one place, read by the
kernels as constexprs and by Python through ``.value``).

Statistics record (``batch_stats_kernel`` → ``token_loss_kernel``), one per row
and one per program: (count, mean, M2) of ℓ for the groups all / A>0 / A<0, the
row's Σ m·ℓ and first counted advantage (VESPO), then for ``gamma="ess_exact"``
the grid sums Σe^{γ_jℓ}, Σe^{2γ_jℓ}, Σℓe^{γ_jℓ}, Σℓe^{2γ_jℓ} of group a (all or
A>0) and group b (A<0), G values each.

Partial record (``token_loss_kernel`` → ``finalize_kernel``), one per program.
Metric vector (``finalize_kernel`` output): ``METRIC_SLOTS`` below.
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

# partial record
P_N = tl.constexpr(0)  # (count, mean, M2, M3, M4) of ℓ over all counted tokens
P_N_POS = tl.constexpr(5)  # (count, mean, M2) of ℓ over A>0
P_N_NEG = tl.constexpr(8)  # (count, mean, M2) of ℓ over A<0
P_LOSS = tl.constexpr(11)  # Σ m·L
P_SEQ_LOSS = tl.constexpr(12)  # Σ_b (Σ_t m·L)/n_b
P_ROWS = tl.constexpr(13)  # rows with n_b > 0
P_NEG_LOG_RATIO = tl.constexpr(14)
P_W = tl.constexpr(15)
P_W_MAX = tl.constexpr(16)
P_PHI = tl.constexpr(17)
P_PHI_ABS_MAX = tl.constexpr(18)
P_OMEGA = tl.constexpr(19)  # Σω, Σω² over all / A>0 / A<0 at +0/+1, +2/+3, +4/+5
P_GAMMA = tl.constexpr(25)
P_GAMMA_MIN = tl.constexpr(26)
P_GAMMA_MAX = tl.constexpr(27)
P_X = tl.constexpr(28)  # + k, k = 0..4: the family's extra per-token terms
PARTIAL_WIDTH = tl.constexpr(40)

METRIC_SLOTS = (
    "token_count", "ppo_kl", "w_mean", "w_max", "phi_mean", "phi_abs_max", "sigma_sq",
    "ess", "ess_ratio", "gamma_mean", "gamma_min", "gamma_max", "gamma", "gamma_pos",
    "gamma_neg", "sigma_sq_pos", "sigma_sq_neg", "gamma_base", "p_case1", "p_case2",
    "p_case3", "p_case4", "clipfrac", "clipfrac_lower", "skewness", "kurtosis",
    "max_weight_ratio", "ess_pos", "ess_ratio_pos", "ess_neg", "ess_ratio_neg",
)
METRIC_WIDTH = tl.constexpr(32)
