"""The small buffers the kernels exchange, each declared once as a list of named fields.
Every slot constant is generated from its declaration: ``<PREFIX><FIELD>`` (the field's name
upper-cased) is the field's first slot, a constexpr the kernels import (Python reads
``.value``), and ``<PREFIX>WIDTH``-style constants give the widths.

Statistics record (``S_``; ``batch_stats_kernel`` → ``token_loss_kernel``), one per
program (batch γ) or one per piece (row rules, see ``rows.py``). Then for
``gamma="ess_exact"``, at ``S_GRID``, the grid sums Σe^{γ_jℓ}, Σe^{2γ_jℓ}, Σℓe^{γ_jℓ},
Σℓe^{2γ_jℓ} of group a (all or A>0) and group b (A<0), G values each (+ k·G + j).

Rollout-correction record (``C_``; ``batch_stats_kernel`` → ``token_loss_kernel``, a correction of
a row quantity): one per piece, indexed as the row statistics: n₀, Σx, the rejection's Σ or max.

Row-sum element (``E_``; ``token_loss_kernel``, seq-* aggregation): two per chunk, the
chunk's head and tail piece (``rows.py``), with flags ROW_STARTS (a tail: its row starts
here) and ROW_ENDS (a head whose row ends here).

Partial record (``P_``; one per program of ``token_loss_kernel``, merged by the last one):
each field says how records merge (``finalize.merge_record``): "sum", "max" (an absent
record holds −inf), or "own" (moments and exponential sums, merged about their summary's
own mean and max by name), and when a specialization fills it (``partial_slots``).

Metric vector (``M_``; the op's output, SPEC §6): the metrics every family shares or its γ rule
gives, by name, then ``extras``: the token means of the family's five extra terms, which its
declared ``extra_metrics`` name (``Family``). ``METRIC_SLOTS``: name → slot.
"""
from dataclasses import dataclass

import triton.language as tl


@dataclass(frozen=True)
class Field:
    name: str
    width: int = 1
    merge: str = "sum"  # partial record: "sum", "max" or "own"
    when: str = ""  # partial record: the capability under which a specialization fills it ("": always)


def _declare(prefix: str, fields) -> int:
    """``<prefix><NAME>`` = the first slot of each field, in this module; returns the total width."""
    offset = 0
    for f in fields:
        globals()[f"{prefix}{f.name.upper()}"] = tl.constexpr(offset)
        offset += f.width
    return offset


def _mask(fields, keep) -> int:
    """Bit k set for every slot k of the fields ``keep(field)`` selects."""
    mask, offset = 0, 0
    for f in fields:
        if keep(f):
            mask |= ((1 << f.width) - 1) << offset
        offset += f.width
    return mask


STATS_FIELDS = (
    Field("n_all", 3),  # (count, mean, M2) of ℓ: all tokens, A>0, A<0
    Field("n_pos", 3),
    Field("n_neg", 3),
    Field("lsum", 1),  # the piece's Σ m·z, z = ℓ or the family's row term (a row weight's log W)
    Field("asum", 1),  # the piece's Σ m·a of the family's row term (0 without one)
    Field("afirst", 1),  # the piece's first counted advantage
    Field("frame", 3),  # (count, Σ m·ℓ, max m·|ℓ|) of all tokens, batch records (``common.batch_frame``)
)
S_BASE_WIDTH = _declare("S_", STATS_FIELDS)
S_GRID = tl.constexpr(S_BASE_WIDTH)

CORR_FIELDS = (Field("n0"), Field("xsum"), Field("kstat"))  # rollout correction per piece (``rollout.py``)
CORR_WIDTH = tl.constexpr(_declare("C_", CORR_FIELDS))

# a token position in a given selection context: hi·2²⁴ + lo, both exact fp32 integers (``selection.py``)
POSITION_SPLIT = tl.constexpr(1 << 24)

ELEMENT_FIELDS = (Field("count"), Field("loss"), Field("kl"), Field("row"), Field("flags"))  # Σ m, Σ m·L, Σ m·k
ELEMENT_WIDTH = tl.constexpr(_declare("E_", ELEMENT_FIELDS))
ROW_STARTS = tl.constexpr(1)
ROW_ENDS = tl.constexpr(2)

PARTIAL_FIELDS = (
    Field("n_all", 2, "own"),  # (count, mean) of ℓ (count, S1 in the batch frame): all, A>0, A<0
    Field("n_pos", 2, "own", "group_moments"),
    Field("n_neg", 2, "own", "group_moments"),
    Field("seq_loss", 1, "sum", "seq"),  # Σ over complete rows of (Σ_t m·L)/n_b
    Field("seq_kl", 1, "sum", "seq_kl"),  # Σ over complete rows of (Σ_t m·k)/n_b
    Field("w_max", 1, "max"),
    Field("phi_max", 1, "max"),  # max |φ|
    Field("g_max", 1, "max", "gamma_stats"),
    Field("neg_g_min", 1, "max", "gamma_stats"),  # −min γ_t
    Field("z_all", 1, "max"),  # max z of the ESS sums, z = γ_t·ℓ: all, A>0, A<0
    Field("z_pos", 1, "max", "sign"),
    Field("z_neg", 1, "max", "sign"),
    Field("m2", 3, "own"),  # M2, M3, M4 of ℓ, all tokens (``common.power_sums_moments``)
    Field("m2_pos", 1, "own", "group_moments"),  # M2 of ℓ, A>0 / A<0
    Field("m2_neg", 1, "own", "group_moments"),
    Field("ess", 2, "own"),  # (Σe^{z−max}, Σe^{2(z−max)}): all, A>0, A<0
    Field("ess_pos", 2, "own", "sign"),
    Field("ess_neg", 2, "own", "sign"),
    Field("loss", 1, "sum"),  # Σ m·L
    Field("kl", 1, "sum", "kl"),  # Σ m·k of the KL term
    Field("w", 1, "sum"),
    Field("phi", 1, "sum"),
    Field("gamma", 1, "sum", "gamma_stats"),  # Σ γ_t
    Field("extras", 5, "sum", "extras"),  # the family's extra per-token terms
    Field("nonfinite", 1, "sum"),
    Field("rows", 1, "sum", "seq"),  # complete rows with n_b > 0
    Field("rollout", 5, "sum", "rollout"),  # rollout correction: Σ m₀·r, Σ m₀·[ρ > hi], Σ m₀·[ρ < lo], rejected, Σ m₀·x
)
PARTIAL_WIDTH = tl.constexpr(_declare("P_", PARTIAL_FIELDS))
P_SUMS = tl.constexpr(_mask(PARTIAL_FIELDS, lambda f: f.merge == "sum"))
P_MAXIMA = tl.constexpr(_mask(PARTIAL_FIELDS, lambda f: f.merge == "max"))
# a program's row of the partial buffer: its record, then the scratch of its merges across
# warps (``common.exchange_warps``): the records of its warps, then the batch context's moments
PARTIAL_SCRATCH = tl.constexpr(40)
CONTEXT_WIDTH = tl.constexpr(12)  # per warp: (count, mean, M2) of up to three groups


def partial_row(warps: int) -> int:
    """Length of a program's row of the partial buffer (a multiple of 4 values)."""
    return PARTIAL_SCRATCH.value + (PARTIAL_WIDTH.value + CONTEXT_WIDTH.value) * warps


def partial_slots(sign_groups: bool, group_moments: bool, has_kl: bool, gamma_stats: bool, seq_agg: bool,
                  extra_terms: int, correction: bool = False) -> int:
    """Bit k set: a specialization fills partial slot k (the others are never reduced, stored
    nor read): the fields whose ``when`` holds, of the extras the family's first ``extra_terms``.
    ``when``: the A>0 / A<0 groups ("sign"; their moments of ℓ if ``group_moments``, else the
    batch statistics have them), the γ_t statistics, the KL term, the row sums, the rollout correction."""
    holds = {"": True, "sign": sign_groups, "group_moments": sign_groups and group_moments,
             "gamma_stats": gamma_stats, "kl": has_kl, "seq": seq_agg, "seq_kl": seq_agg and has_kl, "extras": True,
             "rollout": correction}
    extras = _mask(PARTIAL_FIELDS, lambda f: f.when == "extras")
    first = extras & -extras  # the bit of its first slot
    extras &= (first << extra_terms) - first
    return _mask(PARTIAL_FIELDS, lambda f: holds[f.when] and f.when != "extras") | extras


METRIC_FIELDS = tuple(Field(name) for name in (
    "token_count", "ppo_kl", "w_mean", "w_max", "phi_mean", "phi_abs_max", "sigma_sq",
    "ess", "ess_ratio", "gamma_mean", "gamma_min", "gamma_max", "gamma", "gamma_pos",
    "gamma_neg", "sigma_sq_pos", "sigma_sq_neg", "gamma_base", "skewness", "kurtosis",
    "max_weight_ratio", "ess_pos", "ess_ratio_pos", "ess_neg", "ess_ratio_neg",
    "nonfinite_tokens", "kl_loss", "rollout_is_mean", "rollout_is_fraction_high", "rollout_is_fraction_low",
    "rollout_rs_masked_fraction", "rollout_kl")) + (Field("extras", 5),)
METRIC_WIDTH = tl.constexpr(_declare("M_", METRIC_FIELDS))
METRIC_SLOTS = {f.name: globals()[f"M_{f.name.upper()}"].value for f in METRIC_FIELDS if f.width == 1}
