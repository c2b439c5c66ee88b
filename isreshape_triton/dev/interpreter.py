"""Vectorised custom reductions and scans for Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter runs ``tl.sum``/``tl.max`` in NumPy, but a ``tl.reduce`` or
``tl.associative_scan`` with a user combine function element by element in Python,
one patched ``@triton.jit`` call per element: about 1 ms each, so the record merges
of ``kernels/finalize.py`` (multi-operand ``tl.reduce`` over [L, 2, 2, 2] stacks)
cost seconds per program. ``install()`` replaces those two fallbacks with the
schedule a GPU uses:

* reduce: a pairwise tree, ``combine(x[2i], x[2i+1])`` on whole slices per level,
  left operand always the lower index (associativity is all Triton asks of a combine);
* scan: Hillis-Steele, ``x[i] = combine(x[i - d], x[i])`` for d = 1, 2, 4, ...

so one combine call handles a whole level: ⌈log₂ n⌉ calls instead of n. The
combine function, its dtypes and its NaN handling are the kernel's own; only the
association order differs from the interpreter's left fold (as it does on a GPU).

It also stops re-patching ``triton.language`` on every ``@triton.jit`` device-function
call (``inspect.getmembers`` over the whole module, ~1 ms a call) while the launch that
patched it is running: the patches are module-wide and the launch restores them.

And it converts between fp32 and bf16 as a GPU does. Every fp32 → bf16 store or cast goes
through the interpreter's ``_convert_float`` (from ``create_fp_trunc``, or ``create_fp_to_fp``
for ``rtz``; Triton 3.5 to 3.9), which truncates to the upper 16 bits: about half of all
bf16 results came out 1 ulp nearer zero than the GPU's. It also widens bf16 subnormals wrong.
``install()`` wraps it: fp32 → bf16 rounds to nearest even (toward zero for an explicit
``rtz``), overflowing to ±inf, NaN staying a quiet NaN; bf16 → fp32 is exact. fp16 needs
nothing: it is NumPy's ``astype``, which rounds to nearest even.
"""
import inspect

import numpy as np

_installed = False
_patched_langs = set()  # ids of the language modules patched by the running launch


def _as_array(value, like):
    """A combine result as an array of ``like``'s shape and dtype (a scalar broadcasts)."""
    data = value.handle.data if hasattr(value, "handle") else np.asarray(value)
    return np.broadcast_to(data, like.shape).astype(like.dtype)


def _combine(op, lhs, rhs, dtypes):
    """``op.combine_fn`` applied to whole arrays (lists of operands, same shapes)."""
    args = [op.to_tensor(np.ascontiguousarray(a), t) for a, t in zip(lhs, dtypes)]
    args += [op.to_tensor(np.ascontiguousarray(b), t) for b, t in zip(rhs, dtypes)]
    out = op.combine_fn.fn(*args)
    out = out if isinstance(out, tuple) else (out, )
    return [_as_array(o, a) for o, a in zip(out, lhs)]


def _tree_reduce(self, input):
    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    dtypes = [x.dtype for x in input]
    data = [np.moveaxis(x.handle.data, axis, 0) for x in input]
    while data[0].shape[0] > 1:
        pairs = data[0].shape[0] // 2
        merged = _combine(self, [d[0:2 * pairs:2] for d in data], [d[1:2 * pairs:2] for d in data], dtypes)
        data = [np.concatenate([m, d[2 * pairs:]]) for m, d in zip(merged, data)]
    ret = []
    for d, t in zip(data, dtypes):
        d = d[0]
        if self.keep_dims:
            d = np.expand_dims(d, axis) if original_axis is not None else d.reshape((1, ) * len(input[0].shape))
        elif original_axis is None:
            d = d.item()
        ret.append(self.to_tensor(d, t))
    return ret


def _hillis_steele_scan(self, input):
    dtypes = [x.dtype for x in input]
    data = [np.moveaxis(x.handle.data, self.axis, 0) for x in input]
    n, step = data[0].shape[0], 1
    while step < n:  # whole (power-of-two) blocks: the first `step` results are discarded
        merged = _combine(self, [np.roll(d, step, axis=0) for d in data], data, dtypes)
        data = [np.concatenate([d[:step], m[step:]]) for d, m in zip(data, merged)]
        step *= 2
    return [self.to_tensor(np.ascontiguousarray(np.moveaxis(d, 0, self.axis)), t) for d, t in zip(data, dtypes)]


def _fp32_to_bf16(x, rtz):
    """bf16 bits of fp32 ``x``: rounded to nearest even (on ties, toward the even
    significand), or toward zero; ±inf stays, and so does NaN (quieted)."""
    bits = x.view(np.uint32)
    rounded = bits if rtz else bits + (0x7FFF + ((bits >> 16) & 1))
    return np.where(np.isnan(x), (bits >> 16) | 0x40, rounded >> 16).astype(np.uint16)


def _gpu_bf16(convert_float, tl, rtz):
    """``convert_float`` (the interpreter's ``_convert_float``) with fp32 ↔ bf16 as on a GPU."""

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            return _fp32_to_bf16(input, rounding_mode == rtz)
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:
            return np.asarray(input.astype(np.uint32) << 16)
        return convert_float(input, input_dtype, output_dtype, rounding_mode)

    return convert


class _LaunchScope:
    """The launch's patch scope; restoring it also forgets what was patched."""

    def __init__(self, scope):
        self.scope = scope

    def restore(self):
        self.scope.restore()
        _patched_langs.clear()


class _NothingToRestore:

    def restore(self):
        pass


def _patch_lang_once(patch_lang, lang_modules):

    def patch(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in lang_modules}
        if langs and langs <= _patched_langs:
            return _NothingToRestore()
        scope = patch_lang(fn)
        if scope is None:  # Triton 3.5: the patches are never undone, so once is enough
            _patched_langs.update(langs)
            return None
        launch = not _patched_langs  # else a device function seeing a new module: never undone, as upstream
        _patched_langs.update(langs)
        return _LaunchScope(scope) if launch else scope

    return patch


def install():
    """Patch the interpreter's element-by-element fallbacks, its per-call re-patching
    of ``triton.language`` and its fp32 ↔ bf16 conversions (idempotent)."""
    global _installed
    if _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter
    interpreter.ReduceOps.generic_reduce = _tree_reduce
    interpreter.ScanOps.generic_scan = _hillis_steele_scan
    interpreter._patch_lang = _patch_lang_once(interpreter._patch_lang, (tl, tl.core))
    interpreter._convert_float = _gpu_bf16(interpreter._convert_float, tl, interpreter._ir.ROUNDING_MODE.RTZ)
    _installed = True
