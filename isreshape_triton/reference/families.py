"""The families' references by ``loss_type`` (each declared in ``isreshape_triton/families/``):
:data:`FAMILIES` (φ, F), :data:`STATS` (the batch statistics they need), :func:`phi_F` and
:func:`family_stats`. Shared pieces (:class:`TokenTerms`, ``expm1_over``): :mod:`.shared`.
"""
from __future__ import annotations

import torch

from ..families import FAMILIES as _DECLARED
from ..params import make_params
from .shared import TokenTerms


def no_stats(ell, adv, mask, p, log_ratio_clamp, log_rollout=None):
    return {}


FAMILIES = {name: family.reference for name, family in _DECLARED.items()}
STATS = {name: family.stats or no_stats for name, family in _DECLARED.items()}


def split_psis(stats: dict):
    """(reference statistics, ``psis_*`` diagnostics) of a stats dict."""
    return ({k: v for k, v in stats.items() if not k.startswith("psis_")},
            {k: v for k, v in stats.items() if k.startswith("psis_")})


def phi_F(loss_type, ell, adv=None, params=None, lp=None, **stats) -> TokenTerms:
    """φ, F (and γ_t, extras) of ``loss_type`` for tokens with log-ratio ``ell``.

    ``ell``/``adv`` may be tensors or numbers (``adv=None`` → A ≡ 1); ``lp``: log π for a
    family that reads the log-probs (default ``ell``, i.e. log π_old = 0); ``params``
    a family dataclass (default: SPEC defaults); ``stats`` the family's batch
    statistics as keywords: ``gamma`` (is_reshape), ``gamma_pos``/``gamma_neg``
    (is_reshape_sign), ``gamma_base`` (is_reshape_var), ``log_W``/``first_adv``
    (vespo). No validation or masking: the raw SPEC formulas.
    """
    params = make_params(loss_type, params)
    ell = ell if isinstance(ell, torch.Tensor) else torch.tensor(ell, dtype=torch.float64)
    adv = torch.ones_like(ell) if adv is None else torch.as_tensor(adv, dtype=ell.dtype, device=ell.device)
    if _DECLARED[loss_type].log_probs:
        lp = ell if lp is None else torch.as_tensor(lp, dtype=ell.dtype, device=ell.device)
        stats = {**stats, "lp": lp, "olp": (lp - ell).detach()}
    return FAMILIES[loss_type](ell, adv, params=params, **split_psis(stats)[0])


def family_stats(loss_type, ell, adv, mask, params, log_ratio_clamp=20.0, log_rollout=None, lp=None,
                 position=None) -> dict:
    """The batch statistics of ``loss_type`` (detached, broadcastable to ``[R, T]``);
    ``log_rollout``: log max(r, 1e-8) of rollout IS weights where the family's row weight takes them;
    ``lp``, ``position``: log π (masked to 0) and the kernels' token numbers, passed to the
    statistics of a family that reads the log-probs.

    With ``gamma="psis"`` also ``psis_k`` (all k̂ values, flattened; a diagnostic,
    ignored by :func:`phi_F`)."""
    family = _DECLARED[loss_type]
    log_probs = {"lp": lp.detach(), "position": position} if family.log_probs and family.stats else {}
    return STATS[loss_type](ell.detach(), adv, mask, params, log_ratio_clamp, log_rollout, **log_probs)
