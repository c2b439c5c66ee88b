"""Microbenchmark of the fused policy losses against eager PyTorch: ``python -m bench``.

Kept import-free so that ``bench/__main__.py`` can set ``TRITON_INTERPRET=1``
(no CUDA) before anything imports triton or isreshape_triton: only the standard
library is imported here.

A source checkout without ``pip install`` (``PYTHON=python3 ./run.sh gpu-check`` on a
machine with torch and Triton preinstalled) has no ``isreshape_triton.kernels``:
setup.py installs the top-level ``kernels/`` directory under that name
(``package_dir``). ``SourceTreeFinder`` supplies that mapping as a last resort.
"""
from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SourceTreeFinder:
    """A meta-path finder for a source checkout at ``root``: ``isreshape_triton`` is
    ``root/isreshape_triton`` and ``isreshape_triton.kernels`` is ``root/kernels``.

    It sits at the end of ``sys.meta_path``, so it only answers what nothing else found:
    an installed package (regular or editable) always wins, and the kernels are mapped
    only for the ``isreshape_triton`` of this tree (never under another copy's name)."""

    def __init__(self, root: str = REPO):
        self.root = os.path.abspath(root)
        self.package = os.path.join(self.root, "isreshape_triton")
        self.locations = {"isreshape_triton": self.package,
                          "isreshape_triton.kernels": os.path.join(self.root, "kernels")}

    def find_spec(self, fullname, path=None, target=None):
        where = self.locations.get(fullname)
        if where is None or not os.path.isfile(os.path.join(where, "__init__.py")):
            return None
        if fullname == "isreshape_triton.kernels" and path is not None \
                and self.package not in {os.path.abspath(p) for p in path}:
            return None  # another isreshape_triton is imported: not ours to complete
        return importlib.util.spec_from_file_location(fullname, os.path.join(where, "__init__.py"),
                                                      submodule_search_locations=[where])

    def invalidate_caches(self):
        pass


def install_source_finder(root: str = REPO) -> SourceTreeFinder:
    """Append a ``SourceTreeFinder`` for ``root`` to ``sys.meta_path`` (once per root)."""
    root = os.path.abspath(root)
    for finder in sys.meta_path:
        if isinstance(finder, SourceTreeFinder) and finder.root == root:
            return finder
    finder = SourceTreeFinder(root)
    sys.meta_path.append(finder)
    return finder


install_source_finder()


def use_interpreter() -> None:
    """Run the kernels in Triton's interpreter on the CPU (call before anything imports triton;
    an explicit ``TRITON_INTERPRET`` wins) with ``isreshape_triton.dev.interpreter``: whole-level
    custom reductions and the GPU's fp32 → bf16 rounding."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        from isreshape_triton.dev.interpreter import install

        install()
