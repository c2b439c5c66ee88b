"""Slot layouts of the small buffers the kernels exchange (one place, read by the
kernels as constexprs and by Python through ``.value``).

Statistics record (``batch_stats_kernel`` → ``token_loss_kernel``), one per
program (batch γ) or one per piece (row rules, see ``rows.py``): (count, mean, M2)
of ℓ for the groups all / A>0 / A<0, the piece's Σ m·ℓ and first counted
advantage (VESPO), a batch record's frame sums (count, Σℓ, max |ℓ|) of all tokens,
then for ``gamma="ess_exact"`` the grid sums Σe^{γ_jℓ},
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
S_FRAME = tl.constexpr(11)  # (count, Σ m·ℓ, max m·|ℓ|) of all tokens, batch records (``common.batch_frame``)
S_GRID = tl.constexpr(14)  # + k*G + j; k = 0..3 group a, 4..7 group b
S_BASE_WIDTH = 14

# row-sum element
E_COUNT = tl.constexpr(0)
E_LOSS = tl.constexpr(1)
E_KL = tl.constexpr(2)
E_ROW = tl.constexpr(3)
E_FLAGS = tl.constexpr(4)
ELEMENT_WIDTH = tl.constexpr(5)
ROW_STARTS = tl.constexpr(1)
ROW_ENDS = tl.constexpr(2)

# partial record (``finalize.merge_record``): moments, maxima and exponential sums as
# (count, mean, M2..) / max / Σ about the summary's own mean and max; every other slot a sum
P_N_ALL = tl.constexpr(0)  # (count, mean) of ℓ: all +0 (count, S1 in the batch frame), A>0 +2, A<0 +4
P_N_POS = tl.constexpr(2)
P_N_NEG = tl.constexpr(4)
P_SEQ_LOSS = tl.constexpr(6)  # Σ over complete rows of (Σ_t m·L)/n_b
P_SEQ_KL = tl.constexpr(7)  # Σ over complete rows of (Σ_t m·k)/n_b
P_W_MAX = tl.constexpr(8)  # maxima: w, |φ|, γ_t, −γ_t (min), z of ESS all / A>0 / A<0
P_PHI_MAX = tl.constexpr(9)
P_G_MAX = tl.constexpr(10)
P_NEG_G_MIN = tl.constexpr(11)
P_Z_ALL = tl.constexpr(12)
P_Z_POS = tl.constexpr(13)
P_Z_NEG = tl.constexpr(14)
P_M2 = tl.constexpr(15)  # M2, M3, M4 of all (common.power_sums_moments), M2 of A>0, M2 of A<0
P_M2_POS = tl.constexpr(18)
P_M2_NEG = tl.constexpr(19)
P_ESS = tl.constexpr(20)  # (Σe^{z−max}, Σe^{2(z−max)}), z = γ_t·ℓ: all +0, A>0 +2, A<0 +4
P_LOSS = tl.constexpr(26)  # Σ m·L
P_KL = tl.constexpr(27)  # Σ m·k of the KL term
P_W = tl.constexpr(28)
P_PHI = tl.constexpr(29)
P_GAMMA = tl.constexpr(30)  # Σγ_t
P_EXTRAS = tl.constexpr(31)  # + k, k = 0..4: the family's extra per-token terms
P_NONFINITE = tl.constexpr(36)
P_ROWS = tl.constexpr(37)  # complete rows with n_b > 0
PARTIAL_WIDTH = tl.constexpr(38)
# a program's row of the partial buffer: its record, then the scratch of its merges across
# warps (``common.exchange_warps``): the records of its warps, then the batch context's moments
PARTIAL_SCRATCH = tl.constexpr(40)
CONTEXT_WIDTH = tl.constexpr(12)  # per warp: (count, mean, M2) of up to three groups


def partial_row(warps: int) -> int:
    """Length of a program's row of the partial buffer (a multiple of 4 values)."""
    return PARTIAL_SCRATCH.value + (PARTIAL_WIDTH.value + CONTEXT_WIDTH.value) * warps


def partial_slots(sign_groups: bool, group_moments: bool, has_kl: bool, gamma_stats: bool, seq_agg: bool,
                  extra_terms: int) -> int:
    """Bit k set: a specialization fills partial slot k (the others are never reduced, stored
    nor read): the A>0 / A<0 groups (their ESS; their moments of ℓ if ``group_moments``, else
    the batch statistics have them), the KL term, the γ_t statistics, the row sums and the
    family's first ``extra_terms`` extra terms."""
    slots = [P_N_ALL, P_N_ALL + 1, P_W_MAX, P_PHI_MAX, P_Z_ALL, P_M2, P_M2 + 1, P_M2 + 2, P_ESS, P_ESS + 1,
             P_LOSS, P_W, P_PHI, P_NONFINITE] + [P_EXTRAS + k for k in range(extra_terms)]
    if sign_groups:
        slots += [P_Z_POS, P_Z_NEG] + [P_ESS + k for k in range(2, 6)]
    if sign_groups and group_moments:
        slots += [P_N_POS, P_N_POS + 1, P_N_NEG, P_N_NEG + 1, P_M2_POS, P_M2_NEG]
    if gamma_stats:
        slots += [P_G_MAX, P_NEG_G_MIN, P_GAMMA]
    if has_kl:
        slots += [P_KL] + ([P_SEQ_KL] if seq_agg else [])
    if seq_agg:
        slots += [P_SEQ_LOSS, P_ROWS]
    return sum(1 << k.value for k in set(slots))


METRIC_SLOTS = (
    "token_count", "ppo_kl", "w_mean", "w_max", "phi_mean", "phi_abs_max", "sigma_sq",
    "ess", "ess_ratio", "gamma_mean", "gamma_min", "gamma_max", "gamma", "gamma_pos",
    "gamma_neg", "sigma_sq_pos", "sigma_sq_neg", "gamma_base", "p_case1", "p_case2",
    "p_case3", "p_case4", "clipfrac", "clipfrac_lower", "skewness", "kurtosis",
    "max_weight_ratio", "ess_pos", "ess_ratio_pos", "ess_neg", "ess_ratio_neg",
    "nonfinite_tokens", "kl_loss",
)
METRIC_WIDTH = tl.constexpr(33)
