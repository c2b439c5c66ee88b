"""The family table: how each ``loss_type``'s parameters reach the kernels.

One row per family: a function from the family's parameter dataclass to a
``KernelFamily``: the FAMILY/OPT constexprs, the family's float tuple in the
order its device function in ``kernels/families.py`` unpacks it, the γ rule
(``kernels/gamma.py``) and which statistics it needs. Float parameters are
runtime arguments, so changing them never recompiles a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .kernels import families as kf
from .kernels import gamma as kg
from .params import (IsReshapeParams, IsReshapeSignParams, IsReshapeTRParams, IsReshapeVarParams,
                     PPOClipParams, SAPOParams, VESPOParams, as_number)

ESS_GRID_POINTS = 32  # G of the ess_exact grid (cubic Hermite refinement inside the bracket)
SIGN_GAMMA_POS_RANGE = (0.05, 0.99)  # γ+ interval (SPEC §4)
SIGN_DELTA_NEG_RANGE = (0.01, 0.99)  # γ− = 1 + δ, δ interval (SPEC §4)
_NEG_SATURATION = {"none": 0, "soft": 1, "truncate": 2, "michaelis_menten": 3}


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
    family: int
    params: tuple = ()  # the family's runtime floats, in its device function's order
    opt: int = 0
    gamma_mode: int = 0  # kernels.gamma.GAMMA_FIXED / _ESS / _ESS_EXACT / _GIVEN (psis)
    gamma_rule: GammaRule = GammaRule()
    needs_stats: bool = False  # pass 1 must run
    per_row: bool = False  # per-row γ (gamma_granularity="sequence", VESPO's W): statistics per row
    # (when the γ rule needs them; a fixed γ has none) and γ metrics as token means (metrics.py)
    sign_groups: bool = False  # A>0 / A<0 groups
    extra_terms: int = 0  # how many of the device function's five extra per-token terms the metrics read

    @property
    def ess_exact(self) -> bool:
        return self.gamma_mode == kg.GAMMA_ESS_EXACT.value

    @property
    def psis(self) -> bool:
        return self.gamma_mode == kg.GAMMA_GIVEN.value


def _floats(*values) -> tuple:
    return tuple(as_number(v) for v in values)


def _gamma_mode(gamma) -> int:
    if isinstance(gamma, str):
        return {"ess": kg.GAMMA_ESS.value, "ess_exact": kg.GAMMA_ESS_EXACT.value, "psis": kg.GAMMA_GIVEN.value}[gamma]
    return kg.GAMMA_FIXED.value


def _is_reshape(p: IsReshapeParams, family=kf.IS_RESHAPE.value, params=()) -> KernelFamily:
    mode = _gamma_mode(p.gamma)
    fixed = 0.0 if isinstance(p.gamma, str) else p.gamma
    from_stats = mode in (kg.GAMMA_ESS.value, kg.GAMMA_ESS_EXACT.value)
    return KernelFamily(family, params, gamma_mode=mode,
                        gamma_rule=GammaRule(p.rho_min, fixed, -1.0, (p.gamma_min, p.gamma_max)),
                        needs_stats=from_stats,
                        per_row=p.gamma_granularity == "sequence")


def _is_reshape_var(p: IsReshapeVarParams) -> KernelFamily:
    fam = _is_reshape(p, kf.IS_RESHAPE_VAR.value, params=_floats(p.temperature))
    return replace(fam, extra_terms=5 if fam.per_row else 4)  # p_case1..4 (and γ_base per sequence)


def _is_reshape_sign(p: IsReshapeSignParams) -> KernelFamily:
    fixed = p.gamma_pos is not None and p.gamma_neg is not None
    opt = _NEG_SATURATION[p.neg_saturation] + 4 * (p.pos_weight == "michaelis_menten")
    mode = _gamma_mode(p.gamma)
    rule = GammaRule(p.rho_min, -1.0 if p.gamma_pos is None else p.gamma_pos,
                     -1.0 if p.gamma_neg is None else p.gamma_neg,
                     SIGN_GAMMA_POS_RANGE, SIGN_DELTA_NEG_RANGE)
    return KernelFamily(kf.IS_RESHAPE_SIGN.value,
                        _floats(p.saturation_lambda, p.saturation_w_th, p.truncate_max, p.mm_tau),
                        opt=opt, gamma_mode=mode, gamma_rule=rule,
                        needs_stats=not fixed and mode != kg.GAMMA_GIVEN.value,
                        per_row=p.gamma_granularity == "sequence", sign_groups=True,
                        extra_terms=2 if p.gamma_granularity == "sequence" else 0)  # γ± per sequence


def _is_reshape_tr(p: IsReshapeTRParams) -> KernelFamily:
    return KernelFamily(kf.IS_RESHAPE_TR.value, _floats(p.tau_h, p.tau_c, p.gamma_base, p.gamma_max))


def _ppo_clip(p: PPOClipParams) -> KernelFamily:
    dual = p.clip_ratio_c is not None
    return KernelFamily(kf.PPO_CLIP.value, _floats(p.clip_ratio_low, p.clip_ratio_high,
                                                   p.clip_ratio_c if dual else 0.0), opt=int(dual), extra_terms=2)


def _sapo(p: SAPOParams) -> KernelFamily:
    return KernelFamily(kf.SAPO.value, _floats(p.tau_pos, p.tau_neg))


def _vespo(p: VESPOParams) -> KernelFamily:
    return KernelFamily(kf.VESPO.value, _floats(p.k_pos, p.lambda_pos, p.k_neg, p.lambda_neg),
                        needs_stats=True, per_row=True)


FAMILY_TABLE = {
    "is_reshape": _is_reshape,
    "is_reshape_sign": _is_reshape_sign,
    "is_reshape_tr": _is_reshape_tr,
    "is_reshape_var": _is_reshape_var,
    "ppo_clip": _ppo_clip,
    "sapo": _sapo,
    "vespo": _vespo,
}


def kernel_family(loss_type: str, params) -> KernelFamily:
    return FAMILY_TABLE[loss_type](params)
