"""The loss-family contract. A family is one module, ``isreshape_triton/families/<name>.py``,
declaring ``FAMILY = Family(...)``, beside its device functions in
``kernels/families/<name>.py`` (``token``, and ``row_weight`` for a family whose context is a
per-row weight: ``row_weight(row, clamp, params) -> ctx`` of the row's sums, see
``kernels/families/__init__.py``, with an optional ``row_term``). Every table of the package is derived from the declarations: the loss types,
the parameter classes, the metric names, the reference and the kernel specialization.

Device contract (``kernels/families/<name>.py``)::

    token(ell, w, A, lp, olp, ctx, params, OPT) -> (phi, F, gamma_t, extras)

ell = clamped log-ratio, w = exp(ell), A = advantage, lp / olp = the token's log-probs (unclamped;
for a family whose F is written in log π, such as CISPO's sg(c)·A·log π, or whose φ reads the
probabilities); ``ctx`` = (c0, c1) is the family's context
resolved by the kernel (γ values from its γ rule, or the row weight); ``params`` the family's
runtime floats in the order of ``KernelFamily.params``; OPT its structural option. The loss is
−F, dF/dlog_prob = φ; gamma_t the token's effective IS exponent (ω = w^gamma_t); ``extras`` five
per-token terms whose sums the metrics read (the first ``extra_terms``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .options import as_number

# KernelFamily.gamma_mode: how the context resolves ("given": a token selection's, ``selection.py``)
GAMMA_MODES = ("fixed", "ess", "ess_exact", "psis", "given")


@dataclass(frozen=True)
class GammaRule:
    """The γ rule's runtime floats: ρ_min, fixed values (< 0: data-driven) and intervals of
    group a (all tokens, or A>0) and group b (A<0, as δ = γ− − 1)."""

    rho_min: float = 0.3
    fixed_a: float = -1.0
    fixed_b: float = -1.0
    range_a: tuple = (0.0, 1.0)
    range_b: tuple = (0.0, 1.0)

    def as_tuple(self) -> tuple:
        return tuple(as_number(v) for v in (self.rho_min, self.fixed_a, self.fixed_b, *self.range_a, *self.range_b))


@dataclass(frozen=True)
class KernelFamily:
    """How one family's parameters specialize the kernels. Float parameters are runtime
    arguments, so changing them never recompiles a kernel."""

    params: tuple = ()  # the runtime floats, in the order the device function unpacks them
    opt: int = 0  # the device function's structural option (constexpr)
    gamma_rule: Optional[GammaRule] = None  # None: no γ context (ctx = (0, 0))
    gamma_mode: str = "fixed"  # GAMMA_MODES
    needs_stats: bool = False  # pass 1 must run
    per_row: bool = False  # one context per row (gamma_granularity="sequence", a row weight): row statistics
    # when the rule needs them (a fixed γ has none), γ metrics as token means (metrics.py)
    sign_groups: bool = False  # the γ rule and metrics use the A>0 / A<0 groups
    extra_terms: int = 0  # how many of the device function's five extra terms the γ rule reads (at least
    # its ``extra_metrics``, set by ``families.kernel_family``)
    name: str = ""  # the family (its device module); set by ``families.kernel_family``
    gamma_stats: bool = False  # the family's ``Family.gamma_stats``
    row_weight: bool = False  # the family's ``Family.row_weight``
    rollout_in_row: bool = False  # the family's ``Family.rollout_in_row``
    token_extras: int = 0  # the first extras are per-token terms (its ``extra_metrics``: NaN at a non-finite
    # token), the others row values of its γ rule (NaN only through their row's statistics)
    select_ratio: float = 0.0  # a token selection's k = max(1, ⌊n·ratio⌋) (``selection.py``); 0: none

    @property
    def ess_exact(self) -> bool:
        return self.gamma_mode == "ess_exact"

    @property
    def psis(self) -> bool:
        return self.gamma_mode == "psis"

    @property
    def given(self) -> bool:
        """The context is computed on the device before the loss pass (PSIS, a token selection)."""
        return self.gamma_mode in ("psis", "given")


def floats(*values) -> tuple:
    """A family's runtime floats (a symbolic float stays symbolic: no recompile under torch.compile)."""
    return tuple(as_number(v) for v in values)


def gamma_mode(gamma) -> str:
    """The γ mode of a ``gamma`` option: a rule name, or "fixed" for a number."""
    return gamma if isinstance(gamma, str) else "fixed"


@dataclass(frozen=True)
class Family:
    """One loss family (``loss_type`` = ``name``), declared once in its module.

    ``reference(ell, adv, *, params, **stats) -> reference.shared.TokenTerms``: φ and F in
    plain PyTorch; with ``log_probs`` also the keywords ``lp`` (log π, carrying the gradient, as
    ``ell`` does) and ``olp`` (log π_old, detached). ``stats(ell, adv, mask, params,
    log_ratio_clamp, log_rollout)``: the statistics the reference needs from the whole batch
    (γ, ...), detached; None: none.
    ``metrics``: the family's metric names beyond ``metrics.COMMON`` (and the γ_t statistics)
    that its γ rule gives, computed by ``reference_metrics(ell, adv, mask, terms, stats, params)``
    (float64) and by the kernels' metric vector; then ``extra_metrics``: the token means of its
    first extra terms (the device function's ``extras``, the reference's ``TokenTerms.extras`` by
    these names). ``gamma_stats``: it reports ``gamma_mean``/``_min``/``_max`` of γ_t.
    ``row_weight``: its context is a per-row weight of the row's sums (Σ of ℓ or of its device
    ``row_term``, token count, first advantage; device ``row_weight``); ``rollout_in_row``: rollout IS weights enter that weight
    (Σ log r with Σℓ), not each token. ``log_probs``: its reference reads the log-probs (the device
    function always gets them), and its ``stats`` get ``lp`` (detached) and ``position`` (the
    kernels' token numbers).
    A family that selects tokens (``selection.py``) defines a device ``select``, sets
    ``KernelFamily.select_ratio`` and ``gamma_mode="given"``; its ``token`` gets ctx = (c0, c1,
    selected).
    """

    name: str
    params: type
    reference: Callable
    kernel: Callable
    stats: Optional[Callable] = None
    metrics: tuple = ()
    extra_metrics: tuple = ()
    reference_metrics: Optional[Callable] = None
    gamma_stats: bool = False
    row_weight: bool = False
    rollout_in_row: bool = False
    log_probs: bool = False
