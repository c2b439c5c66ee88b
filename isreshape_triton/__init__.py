"""isreshape-triton: fused Triton kernels for IS-Reshape policy-gradient losses."""
import torch as _torch

from . import versions as _versions

_versions.check(_torch.__version__, _versions.installed_triton())

from . import reference
from .api import PolicyLoss, policy_loss, uses_kernels
from .from_logits import policy_loss_from_logits, selective_log_softmax
from .metrics import metric_names
from .families import FAMILIES as _FAMILIES
from .params import AGG_MODES, LOSS_TYPES, RolloutCorrection, make_params
from .sampling import SamplingResult, optimal_sampling

_PARAMS = {family.params.__name__: family.params for family in _FAMILIES.values()}  # IsReshapeParams, ...
globals().update(_PARAMS)

__all__ = [
    "policy_loss", "PolicyLoss", "policy_loss_from_logits", "selective_log_softmax", "reference", "LOSS_TYPES", "AGG_MODES", "make_params",
    "metric_names", "uses_kernels", *_PARAMS, "RolloutCorrection", "optimal_sampling", "SamplingResult",
]
__version__ = "0.1.0"
