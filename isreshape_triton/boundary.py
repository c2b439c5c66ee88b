"""The torch.compile boundary of the public entry point (``irt.policy_loss``).

Dynamo cannot trace the package's Python front end (frozen option dataclasses,
validation of Python numbers, the launch plan), and it does not have to: the front
end is called through ``torch._dynamo.nonstrict_trace`` when Dynamo traces it (made at
that point: the package does not import ``torch._dynamo`` itself), so a compiled function
holds one opaque call whose torch ops (the custom op ``isreshape_triton::policy_loss``,
PSIS's smoothing, the reference's ops) AOTAutograd traces with fake tensors. No
graph break under ``fullgraph=True``.

Floats: a float argument of the compiled function that Dynamo traces as symbolic
(after its value changed once) stays symbolic through the front end: validation
compares it (range guards, never a guard on its value), and it reaches the custom op
as a float64 tensor computed in the graph (``custom_op.split_symbolic``), so new values of
a parameter schedule reuse the graph. Ints are made static here (they select kernel
specializations and shapes). Tensors (the batch, ``cu_seqlens``, tensor-valued
counts) are graph inputs: new values never recompile. The option dataclasses (``params=``,
``rollout_correction=``) cross the boundary field by field (pytree dataclasses).
"""
from __future__ import annotations

import functools
import operator

import torch

from .params import PARAMS_BY_LOSS_TYPE, RolloutCorrection

for _cls in (*PARAMS_BY_LOSS_TYPE.values(), RolloutCorrection):
    torch.utils._pytree.register_dataclass(_cls)


class _Absent:
    """``None`` across the boundary: ``nonstrict_trace`` refuses a ``None`` argument (an SFT
    call's advantages, a missing mask, ``clip_ratio_c=None``), so it travels as this pytree
    node without leaves and is ``None`` again inside."""


ABSENT = _Absent()
torch.utils._pytree.register_pytree_node(_Absent, lambda a: ((), None), lambda children, context: ABSENT)


def static_number(v):
    """``v`` for the boundary: a Python int as its exact value, which makes Dynamo specialize a
    symbolic one (``operator.index`` has no symbolic form), ``None`` as :data:`ABSENT`. Floats
    stay symbolic (ops.split_symbolic)."""
    if type(v) is int:
        return operator.index(v)
    return ABSENT if v is None else v


def _present(v):
    return None if v is ABSENT else v


def compile_boundary(fn):
    """``fn`` with its body hidden from Dynamo (see the module docstring); eager calls
    go straight to ``fn``.

    The opaque wrapper is made where it is needed: Dynamo folds ``is_compiling()`` to
    True and turns the ``torch._dynamo.nonstrict_trace(fn)`` call in the traced code
    into the opaque call itself, so importing the package never imports ``torch._dynamo``
    (seconds) and a function compiled before any eager call sees the boundary too. Where
    ``is_compiling()`` is True without Dynamo (non-strict ``torch.export``), the call makes
    a fresh wrapper that just calls ``fn``."""

    @functools.wraps(fn)
    def opaque(*args, **kwargs):  # the body Dynamo does not trace: the arguments back from static_number
        return fn(*map(_present, args), **{k: _present(v) for k, v in kwargs.items()})

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch._dynamo.nonstrict_trace(opaque)(*map(static_number, args),
                                                         **{k: static_number(v) for k, v in kwargs.items()})
        return fn(*args, **kwargs)

    return entry
