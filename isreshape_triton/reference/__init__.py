"""Pure-PyTorch reference of every loss family: the oracle in tests (SPEC §1, §7).

Readable, straight from the SPEC formulas; no host sync (no ``.item()``, no
boolean indexing). Modules:

* :mod:`.loss`        — :func:`policy_loss` (same signature as ``irt.policy_loss``)
* :mod:`.families`    — every family's token function (φ, F; declared in
  ``isreshape_triton/families/``, exported here by ``loss_type``), :data:`FAMILIES`,
  :data:`STATS`, :func:`phi_F`, :func:`family_stats`
* :mod:`.shared`      — :class:`TokenTerms`, :func:`expm1_over`, the metrics' masked reductions
* :mod:`.gamma`       — masked variance, γ rules (``ess``, ``ess_exact``, ``psis``, fixed), sign γ±
  (PSIS itself: :mod:`isreshape_triton.psis`, shared with the fused op)
* :mod:`.aggregation` — :func:`aggregate` and :func:`agg_scale` (s_t)
* :mod:`.diagnostics` — :func:`compute_metrics`
* :mod:`.from_logits` — :func:`policy_loss_from_logits`, :func:`selective_log_softmax` (SPEC §8)
* :mod:`.sampling`    — :func:`optimal_sampling` (SPEC §9, fp64 brute force)
"""
from .aggregation import agg_scale, aggregate
from .diagnostics import compute_metrics
from .families import FAMILIES, STATS, family_stats, phi_F
from .gamma import (ess_ratio, gamma_closed_form, gamma_ess_exact, masked_moments, select_gamma,
                    select_gamma_k, sign_gammas)
from .from_logits import policy_loss_from_logits, selective_log_softmax
from .loss import compute_dtype, policy_loss
from .sampling import optimal_sampling
from .shared import TokenTerms, expm1_over

globals().update(FAMILIES)  # reference.<loss_type>: the family's token function

__all__ = [
    "policy_loss", "policy_loss_from_logits", "selective_log_softmax", "compute_dtype", "phi_F", "family_stats", "FAMILIES", "STATS", "TokenTerms",
    *FAMILIES,
    "expm1_over", "aggregate", "agg_scale", "compute_metrics", "masked_moments", "gamma_closed_form",
    "gamma_ess_exact", "ess_ratio", "select_gamma", "select_gamma_k", "sign_gammas", "optimal_sampling",
]
