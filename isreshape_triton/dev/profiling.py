"""Machine-independent work counters for the tests and the benchmark.

Three context managers:

``OpCounter``      a ``TorchDispatchMode`` that counts the aten ops PyTorch runs.
``LaunchCounter``  counts Triton kernel launches (GPU and ``TRITON_INTERPRET=1``).
``count_work()``   both at once; yields a :class:`Work` summary.

Counting rules of ``OpCounter`` (every aten op that reaches the Python dispatcher):

* **view / metadata ops** (``OpOverload.is_view``: view, expand, as_strided, t,
  transpose, permute, select, slice, unsqueeze, squeeze, alias, detach, ... plus
  ``_unsafe_view``, ``lift_fresh``, ``set_``, ``sym_*``): ignored, 0 launches, 0 bytes.
* **allocations** (``empty``, ``empty_like``, ``empty_strided``, ``new_empty*``,
  ``empty_permuted``, ``scalar_tensor``): no kernel runs; counted in ``allocs``
  and ``alloc_bytes``, not in ``launches`` or ``bytes``.
  (``zeros``/``ones``/``full``/``*_like`` fill memory, so they *are* launches.)
* **every other op** is one kernel launch.  Its ``bytes`` are the sizes of its
  tensor inputs plus its tensor outputs.  A tensor's size is the number of
  distinct elements it addresses times the item size: a view counts its viewed
  elements, not its base storage; a stride-0 (broadcast) dimension counts once.
  An in-place op counts the mutated tensor as read and written.
* **host syncs** (``syncs``; a subset of launches, counted as they would be on a
  GPU even when the run is on the CPU): ``_local_scalar_dense`` (``.item()``,
  ``float(t)``, ``if t:``), ``is_nonzero``, ``equal``, ``nonzero``,
  ``masked_select``, ``unique*``, ``bincount``, ``histc``, ``index``/``index_put``
  with a boolean index, ``repeat_interleave`` without ``output_size``, and a
  copy from a CUDA tensor to the host.  With ``strict=True`` the first sync op
  raises ``RuntimeError`` (the *sync detector*).
* **peak memory** (``peak_bytes``): the largest total size of storages created by
  counted ops (outputs and allocations) alive at the same time inside the
  region, tracked through the storages' lifetimes. Inputs created before the
  region are not included; the CUDA caching allocator's rounding is not modelled.
* **fused custom ops** registered with :func:`register_fused_op` (the package's
  ``torch.library`` ops) are not one launch: their Python implementation runs
  under the counter, which counts what it does (allocations, aten ops, syncs;
  Triton launches are counted by ``LaunchCounter`` in any case).
* ops run **while a Triton kernel is launching** are ignored: the interpreter
  (``TRITON_INTERPRET=1``) copies every tensor argument to the host and back
  with aten ops, which are not work of the kernel.  ``LaunchCounter``'s hook
  sets the flag (see :func:`in_triton_launch`); the hook is installed by both
  counters.

Counting rule of ``LaunchCounter``: one launch per non-warmup call of
``JITFunction.run`` (GPU) or of the interpreter's ``GridExecutor`` (one per launch), which is
what ``kernel[grid](...)`` and the autotuner call; the kernel name and the grid
(resolved if it is callable) are recorded.  On GPU, launches of already
compiled kernels that bypass ``JITFunction.run`` (``CompiledKernel[grid]``, e.g.
ahead-of-time kernels) are caught by a ``triton.knobs.runtime.launch_enter_hook``
while a counter is active.  Autotuning benchmark launches count too: warm up
before counting.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["OpCounter", "LaunchCounter", "KernelLaunch", "Work", "count_work",
           "in_triton_launch", "tensor_bytes", "install_triton_hooks", "register_fused_op"]

# ----------------------------------------------------------------------------- op classes

_SKIP = frozenset({
    "detach", "alias", "_unsafe_view", "lift_fresh", "set_", "_reshape_alias", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_same_storage_numel",
    "_nested_tensor_size", "record_stream", "resize_",
})
_ALLOC = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    "scalar_tensor",
})
_SYNC = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "bincount", "histc", "allclose",
})
_BOOL_INDEX = frozenset({"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"})


_FUSED_OPS = {}  # OpOverload -> its Python implementation (counted by what it runs)


def register_fused_op(op, impl) -> None:
    """Count the custom op ``op`` (an ``OpOverload``) by the work of ``impl``, its Python
    implementation, instead of as one aten op."""
    _FUSED_OPS[op] = impl


def _register_package_ops() -> None:
    """The package's custom ops (``custom_op.py``) count by what their implementation runs."""
    from .. import custom_op

    register_fused_op(torch.ops.isreshape_triton.policy_loss.default, custom_op._policy_loss_forward)
    register_fused_op(torch.ops.isreshape_triton.policy_loss_backward.default, custom_op._policy_loss_backward)


_register_package_ops()


def _base_name(func) -> str:
    return func._schema.name.split("::")[-1]


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements ``t`` addresses × item size (stride-0 dims count once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> List[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _is_sync(name: str, overload: str, args, kwargs, inputs: List[torch.Tensor], outputs) -> bool:
    if name in _SYNC:
        return True
    if name in _BOOL_INDEX:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in (indices or ()))
    if name == "repeat_interleave":  # tensor repeats: the output size needs the host
        return overload in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize"):
        outs = _tensors(outputs)
        return any(t.device.type != "cpu" for t in inputs) and any(t.device.type == "cpu" for t in outs)
    return False


# ----------------------------------------------------------------------------- triton hooks

_IN_LAUNCH = 0  # > 0 while a Triton launch runs (module level: autograd runs backward on other threads)
_IN_RUN = threading.local()  # inside our JITFunction.run wrapper (so the knobs hook does not count twice)
_ACTIVE: List["LaunchCounter"] = []
_HOOKS_INSTALLED = False
_HOOK_LOCK = threading.Lock()


def in_triton_launch() -> bool:
    """True while a Triton kernel launch (hooked by this module) is in progress."""
    return _IN_LAUNCH > 0


@dataclass
class KernelLaunch:
    """One Triton launch: the kernel's name and its grid (``None`` if it could not be resolved)."""

    name: str
    grid: Optional[tuple]


def _kernel_name(fn_obj) -> str:
    fn = getattr(fn_obj, "fn", None)
    return getattr(fn, "__name__", None) or getattr(fn_obj, "__name__", type(fn_obj).__name__)


def _resolve_grid(fn_obj, grid, args, kwargs):
    try:
        if callable(grid):
            sig = inspect.signature(fn_obj.fn)
            bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
            bound.apply_defaults()
            meta = dict(bound.arguments)
            meta.update({k: v for k, v in kwargs.items() if k not in meta})
            grid = grid(meta)
        return tuple(int(g) for g in grid)
    except Exception:  # noqa: BLE001 - the grid is informational only
        return None


def _record(name: str, grid) -> None:
    for counter in list(_ACTIVE):
        counter.records.append(KernelLaunch(name, grid))


def _counted(orig, grid_and_warmup):
    """``orig`` counting each non-warmup call as one launch; ``grid_and_warmup(self, kwargs)``
    says the call's grid and whether it is a warmup."""
    @functools.wraps(orig)
    def launch(self, *args, **kwargs):
        global _IN_LAUNCH
        grid, warmup = grid_and_warmup(self, kwargs)
        if warmup:
            return orig(self, *args, **kwargs)
        _IN_LAUNCH += 1
        depth = getattr(_IN_RUN, "depth", 0)
        _IN_RUN.depth = depth + 1
        try:
            result = orig(self, *args, **kwargs)
        finally:
            _IN_LAUNCH -= 1
            _IN_RUN.depth = depth
        if _ACTIVE:
            _record(_kernel_name(self), _resolve_grid(self, grid, args, kwargs))
        return result

    launch._isreshape_wrapped = True
    return launch


def _knobs_enter_hook(metadata) -> None:
    """GPU launches of compiled kernels that did not go through ``JITFunction.run``."""
    if getattr(_IN_RUN, "depth", 0) > 0 or not _ACTIVE:
        return
    try:
        name = metadata.get()["name"]
    except Exception:  # noqa: BLE001
        name = "<compiled kernel>"
    _record(name, None)


def install_triton_hooks() -> bool:
    """Wrap ``JITFunction.run`` and the interpreter's ``GridExecutor.__call__`` once (idempotent).

    Returns False when Triton is not importable (then there is nothing to count).
    """
    global _HOOKS_INSTALLED
    with _HOOK_LOCK:
        if _HOOKS_INSTALLED:
            return True
        try:
            from triton.runtime import interpreter as _interp
            from triton.runtime import jit as _jit
        except Exception:  # noqa: BLE001 - triton missing or broken: no Triton launches possible
            return False
        # GPU: JITFunction.run(*args, grid=, warmup=); interpreter: every launch (in every
        # supported Triton) is one GridExecutor call, whose grid is its attribute
        for cls, method, grid_and_warmup in (
                (_jit.JITFunction, "run", lambda self, kw: (kw["grid"], kw["warmup"])),
                (_interp.GridExecutor, "__call__", lambda self, kw: (self.grid, kw.get("warmup", False)))):
            if not getattr(getattr(cls, method), "_isreshape_wrapped", False):
                setattr(cls, method, _counted(getattr(cls, method), grid_and_warmup))
        _HOOKS_INSTALLED = True
        return True


def _set_knobs_hook(on: bool) -> None:
    try:
        from triton import knobs
        chain = knobs.runtime.launch_enter_hook
        (chain.add if on else chain.remove)(_knobs_enter_hook)
    except Exception:  # noqa: BLE001 - older/newer triton without hook chains
        pass


# ----------------------------------------------------------------------------- counters


class _Storages:
    """Live bytes of storages created inside a region (shared with weakref finalizers)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.keys = set()

    def add(self, storage) -> None:
        key = storage.data_ptr()
        if key in self.keys or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self.keys.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key, nbytes) -> None:
        self.keys.discard(key)
        self.live -= nbytes


class OpCounter(TorchDispatchMode):
    """Counts aten-level work; see the module docstring for the rules.

    Fields: ``launches``, ``bytes``, ``syncs``, ``allocs``, ``alloc_bytes``,
    ``peak_bytes``, ``ops`` (names of the counted launches, in order) and
    ``sync_ops`` (names of the syncs).  ``strict=True`` raises on a sync op.
    """

    def __init__(self, strict: bool = False, track_memory: bool = True):
        super().__init__()
        self.strict = strict
        self.track_memory = track_memory
        self.launches = 0
        self.bytes = 0
        self.syncs = 0
        self.allocs = 0
        self.alloc_bytes = 0
        self.ops: List[str] = []
        self.sync_ops: List[str] = []
        self._mem = _Storages()

    @property
    def peak_bytes(self) -> int:
        return self._mem.peak

    def __enter__(self):
        install_triton_hooks()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _IN_LAUNCH > 0:  # the interpreter's host copies around a Triton launch
            return func(*args, **kwargs)
        impl = _FUSED_OPS.get(func)
        if impl is not None:
            with self:  # the mode is off inside its own handler: count the ops impl runs
                return impl(*args, **kwargs)
        name = _base_name(func)
        if func.is_view or name in _SKIP:
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        if name in _ALLOC:
            out = func(*args, **kwargs)
            self.allocs += 1
            self.alloc_bytes += sum(tensor_bytes(t) for t in _tensors(out))
            self._track(out, inputs)
            return out
        if self.strict and _is_sync(name, func._overloadname, args, kwargs, inputs, ()):
            raise RuntimeError(f"host-device sync: aten::{name} (OpCounter(strict=True))")
        out = func(*args, **kwargs)
        if _is_sync(name, func._overloadname, args, kwargs, inputs, out):
            if self.strict:  # only detectable from the output (device-to-host copy)
                raise RuntimeError(f"host-device sync: aten::{name} (OpCounter(strict=True))")
            self.syncs += 1
            self.sync_ops.append(func.name())
        self.launches += 1
        self.ops.append(func.name())
        self.bytes += sum(tensor_bytes(t) for t in inputs) + sum(tensor_bytes(t) for t in _tensors(out))
        self._track(out, inputs)
        return out

    def _track(self, out, inputs) -> None:
        if not self.track_memory:
            return
        seen = {t.untyped_storage().data_ptr() for t in inputs}
        for t in _tensors(out):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                self._mem.add(storage)


class LaunchCounter:
    """Counts Triton kernel launches inside a ``with`` block.

    ``records`` holds one :class:`KernelLaunch` per launch; ``launches`` is their
    number, ``kernels`` their names and ``by_kernel`` a ``Counter`` of names.
    Counters nest; every active counter sees every launch.
    """

    def __init__(self):
        self.records: List[KernelLaunch] = []

    @property
    def launches(self) -> int:
        return len(self.records)

    @property
    def kernels(self) -> List[str]:
        return [r.name for r in self.records]

    @property
    def by_kernel(self) -> Counter:
        return Counter(self.kernels)

    def __enter__(self):
        install_triton_hooks()
        if not _ACTIVE:
            _set_knobs_hook(True)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _set_knobs_hook(False)
        return False


@dataclass
class Work:
    """Summary of :func:`count_work`: Triton launches plus aten-level work."""

    ops: OpCounter
    triton: LaunchCounter
    extra: dict = field(default_factory=dict)

    @property
    def triton_launches(self) -> int:
        return self.triton.launches

    @property
    def torch_launches(self) -> int:
        return self.ops.launches

    @property
    def launches(self) -> int:
        """All kernel launches: Triton kernels plus non-view aten ops."""
        return self.triton.launches + self.ops.launches

    @property
    def bytes(self) -> int:
        """Bytes of the aten ops only (Triton kernels need an analytic traffic model)."""
        return self.ops.bytes

    @property
    def syncs(self) -> int:
        return self.ops.syncs

    @property
    def allocs(self) -> int:
        return self.ops.allocs

    @property
    def peak_bytes(self) -> int:
        return self.ops.peak_bytes

    @property
    def kernels(self) -> List[str]:
        return self.triton.kernels

    def as_dict(self) -> dict:
        return {"launches": self.launches, "triton_launches": self.triton_launches,
                "torch_launches": self.torch_launches, "bytes": self.bytes, "syncs": self.syncs,
                "allocs": self.allocs, "peak_bytes": self.peak_bytes, "kernels": self.kernels,
                "torch_ops": list(self.ops.ops), "sync_ops": list(self.ops.sync_ops)}


@contextlib.contextmanager
def count_work(strict: bool = False, track_memory: bool = True):
    """Count Triton launches and aten ops together: ``with count_work() as w: ...``."""
    ops = OpCounter(strict=strict, track_memory=track_memory)
    triton_counter = LaunchCounter()
    with triton_counter, ops:
        yield Work(ops, triton_counter)
