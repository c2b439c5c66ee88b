"""The loss families, one module each (``<name>.py`` declares ``FAMILY``, see ``family.py``),
discovered here: ``FAMILIES`` maps ``loss_type`` to its ``Family``, in module-name order.
Adding a family is its module here, its device functions in ``kernels/families/<name>.py``
and a row of the tests' family table; nothing else names it.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace

from ..family import KernelFamily


def _discover() -> dict:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        if family.name != info.name:
            raise RuntimeError(f"families/{info.name}.py declares the family {family.name!r}: a family's "
                               f"module is named after it")
        found[family.name] = family
    return found


FAMILIES = _discover()


def kernel_family(loss_type: str, params) -> KernelFamily:
    """The kernel specialization of ``loss_type`` with (validated) ``params``."""
    return bind(FAMILIES[loss_type].kernel(params), loss_type)


def bind(kernel: KernelFamily, loss_type: str) -> KernelFamily:
    """``kernel`` with what the family declares: its name, capabilities and extra metrics."""
    family = FAMILIES[loss_type]
    return replace(kernel, name=family.name, gamma_stats=family.gamma_stats, row_weight=family.row_weight,
                   rollout_in_row=family.rollout_in_row, token_extras=len(family.extra_metrics),
                   extra_terms=max(kernel.extra_terms, len(family.extra_metrics)))
