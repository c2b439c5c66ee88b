"""The torch and Triton versions the package supports (SPEC §14), checked when it is imported.

The window is what CI proves: the whole suite on the newest Triton and the kernel suite on the
oldest (``./run.sh test-oldest``). A CUDA torch pins its Triton (torch 2.9 → 3.5, 2.11 → 3.6,
2.13 → 3.7, 2.14 → 3.8); version-dependent Triton APIs sit in ``kernels/compat.py``.
setup.py declares the same bounds.
"""
from __future__ import annotations

import importlib.metadata
import re

TORCH_MIN = (2, 9)
TRITON_MIN, TRITON_BEYOND = (3, 5), (4, 0)  # [oldest supported, first unsupported)


def version_tuple(version: str) -> tuple:
    """(major, minor) of '3.6.0', '2.13.0+cpu', '3.7.0.dev20260101' …"""
    return tuple(int(re.match(r"\d*", p).group() or 0) for p in version.split(".")[:2])


def installed_triton() -> str | None:
    """The installed Triton's version (by distribution metadata: importing triton costs ~0.3 s);
    None when there is none (the reference path still works; the kernels need it)."""
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def _fmt(v: tuple) -> str:
    return ".".join(map(str, v))


def check(torch_version: str, triton_version: str | None) -> None:
    """ImportError naming the installed version and the supported range when outside it."""
    if version_tuple(torch_version) < TORCH_MIN:
        raise ImportError(f"isreshape_triton needs torch >= {_fmt(TORCH_MIN)}; torch {torch_version} is installed")
    if triton_version is not None and not TRITON_MIN <= version_tuple(triton_version) < TRITON_BEYOND:
        raise ImportError(f"isreshape_triton needs triton >= {_fmt(TRITON_MIN)}, < {_fmt(TRITON_BEYOND)} "
                          f"(the Triton of torch >= {_fmt(TORCH_MIN)}); triton {triton_version} is installed")
