"""Ahead-of-time compilation of every kernel specialization for sm_90 (H100), on a
machine without a GPU, and the resource report (registers, shared memory, spills).

    python -m isreshape_triton.dev.aot [--specs specs.json] [--out report.json]

A *specialization* is what Triton compiles once: the kernel, the types of its
runtime arguments and the values of its constexprs. ``specs_from_plan`` derives
them from the launches the op would make (``launch.plan_launches``), so the report
covers exactly what runs. Compilation happens in a separate process without
``TRITON_INTERPRET`` (the interpreter replaces the JIT); registers and shared
memory come from ``cuobjdump -res-usage`` on the cubin, spills from ``ptxas -v`` run
with Triton's own options on Triton's PTX. With ``sass=True`` a row also carries the
cubin's SASS (``cuobjdump -sass``) and the same listing with source lines (``nvdisasm -g``),
which ``bench/sass_model.py`` reads.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch

REPORT_PATH = Path(__file__).resolve().parent.parent / "bench" / "results" / "aot_report.json"
_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.bool: "i1", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
         torch.uint8: "u8"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, tuple):  # a tuple argument (a family's float parameters)
        return [_arg_type(v) for v in value]
    raise TypeError(f"unsupported kernel argument {value!r}")


def _constexpr_value(value):
    """JSON form of a constexpr: Triton dtypes by name, device functions (a family's ``TOKEN``)
    by ``kernel_path``."""
    if hasattr(value, "primitive_bitwidth"):
        return {"dtype": {"fp32": "float32", "fp64": "float64"}.get(str(value), str(value))}
    if callable(value):
        return {"jit": kernel_path(value)}
    return value


def _constexpr(value):
    """A constexpr back from its JSON form (``_constexpr_value``)."""
    if isinstance(value, dict):
        import triton.language as tl

        return getattr(tl, value["dtype"]) if "dtype" in value else _kernel(value["jit"])
    return value


def kernel_path(kernel) -> str:
    """``module:name`` of a ``@triton.jit`` function (how a spec names its kernel)."""
    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    return f"{fn.__module__}:{fn.__name__}"


def launch_spec(launch, jit_values: bool = False) -> dict:
    """The specialization of one ``launch.Launch``: kernel path, argument types, constexprs.

    ``jit_values``: also what Triton's JIT specializes on argument values on a GPU, for the
    arguments not in ``do_not_specialize``: an integer equal to 1 becomes a constant, and
    tensors with a 16-byte-aligned address and integers divisible by 16 are marked
    ``divisible`` (``tt.divisibility = 16``: what lets loads vectorize).
    """
    spec = {"kernel": kernel_path(launch.kernel),
            "signature": {k: _arg_type(v) for k, v in launch.args.items()},
            "constexprs": {k: _constexpr_value(v) for k, v in launch.constexprs.items()},
            "options": dict(launch.options)}
    if jit_values:
        fixed, unaligned = _unspecialized(launch.kernel)
        divisible = []
        for k, v in launch.args.items():
            if k in fixed or isinstance(v, bool) or not isinstance(v, (int, torch.Tensor)):
                continue
            if isinstance(v, int) and v == 1:
                spec["constexprs"][k] = 1
                del spec["signature"][k]
            elif k not in unaligned and (v.data_ptr() if isinstance(v, torch.Tensor) else v) % 16 == 0:
                divisible.append(k)
        spec["divisible"] = divisible
    return spec


def _unspecialized(kernel) -> tuple:
    """Names of the arguments in ``do_not_specialize`` and ``do_not_specialize_on_alignment``
    (a JIT function's attributes, an interpreted function's ``kwargs``; names or indices)."""
    options = getattr(kernel, "kwargs", None) or {}
    names = kernel.arg_names

    def as_names(key):
        items = getattr(kernel, key, None) if hasattr(kernel, key) else options.get(key)
        return {names[i] if isinstance(i, int) else i for i in items or ()}

    return as_names("do_not_specialize"), as_names("do_not_specialize_on_alignment")


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


SINGLES = ("constexprs.SLOTS",)  # derived from the family and options (layout.partial_slots): each value once


def _features(spec: dict) -> list:
    """(field, value) items of a spec, one per argument type, constexpr, option and alignment."""
    items = [(f"{part}.{k}", json.dumps(v, sort_keys=True))
             for part in ("signature", "constexprs", "options") for k, v in spec.get(part, {}).items()]
    return items + [(f"divisible.{k}", "1") for k in spec.get("divisible", ())]


def _pairs(spec: dict) -> set:
    f = sorted(_features(spec))
    single = [(x,) for x in f if x[0] in SINGLES]
    f = [x for x in f if x[0] not in SINGLES]
    return {(a, b) for i, a in enumerate(f) for b in f[i + 1:]} | set(single)


def pairwise_cover(specs: list) -> list:
    """A subset of ``specs`` in which every pair of (field, value) items that occurs together in
    some spec of a kernel occurs together in a chosen spec of that kernel (greedy, deterministic:
    most uncovered pairs first, ties in ``spec_key`` order); every value of a field in SINGLES
    occurs in a chosen spec."""
    chosen = []
    by_kernel = {}
    for spec in sorted(specs, key=spec_key):
        by_kernel.setdefault(spec["kernel"], []).append(spec)
    for group in by_kernel.values():
        pairs = [_pairs(spec) for spec in group]
        uncovered = set().union(*pairs)
        while uncovered:
            best = max(range(len(group)), key=lambda i: (len(pairs[i] & uncovered), -i))
            chosen.append(group[best])
            uncovered -= pairs[best]
    return chosen


def specs_from_plan(log_prob, old_log_prob, advantages, response_mask, loss_type, **options) -> list:
    """Specializations the op launches for these inputs (nothing is launched)."""
    from .. import launch
    from ..families import kernel_family
    from ..inputs import prepare_inputs
    from ..params import AggConfig, KLConfig, correction_args, make_params, rollout_config

    agg = AggConfig(options.pop("loss_agg_mode", "token-mean"))
    clamp = options.pop("log_ratio_clamp", 20.0)
    kl = KLConfig(options.pop("kl_coef", 0.0), options.pop("kl_type", "low_var_kl"), options.pop("kl_correction", None))
    weights, rollout_lp = options.pop("rollout_is_weights", None), options.pop("rollout_log_prob", None)
    correction = rollout_config(weights, rollout_lp, options.pop("rollout_correction", None))
    x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, clamp, options.pop("cu_seqlens", None),
                       False, weights, options.pop("ref_log_prob", None), rollout_lp)
    fam = kernel_family(loss_type, make_params(loss_type, **options))
    gamma = torch.zeros(2, dtype=launch.acc_dtype(log_prob.dtype)) if fam.psis else None
    plan = launch.plan_launches(x, fam, agg, clamp, write_grad=log_prob.requires_grad, gamma=gamma, kl=kl,
                                correction=correction_args(correction))
    launches = [step for step in plan.steps if isinstance(step, launch.Launch)]
    if log_prob.requires_grad:
        launches.append(launch.backward_launch(plan.neg_phi, torch.empty_like(log_prob), plan.grad_scale,
                                               plan.loss, plan.row_count, x.cu_seqlens, plan.geometry,
                                               agg.loss_agg_mode == "seq-mean-token-mean"))
    return [launch_spec(step) for step in launches]


# the rollout correction's weight and rejection modes and levels, on families without and with statistics
ROLLOUT_CONFIGS = [("ppo_clip", {"weight": "mask", "weight_min": 0.5, "reject": "k3", "reject_max": 0.1}),
                   ("is_reshape", {"weight": "truncate", "reject": "k1", "reject_min": 0.5, "ratio_of": "current"}),
                   ("gspo", {"weight": None, "reject": "k2", "reject_max": 0.1}),
                   ("ppo_clip", {"level": "sequence", "reject": "k2", "reject_max": 0.1,
                                 "reject_level": "sequence_max"}),
                   ("is_reshape", {"level": "sequence", "weight": "mask", "weight_min": 0.5}),
                   ("vespo", {"reject": "k1", "reject_min": 0.5, "reject_level": "sequence_mean"})]


def default_specs() -> list:
    """A representative set: every family option and γ mode, every input dtype, with and
    without advantages and mask (tile sizes do not depend on the shape), and every
    specialization of ``optimal_sampling``."""
    from ..params import LOSS_TYPES

    configs = [(lt, {}) for lt in LOSS_TYPES] + [
        ("is_reshape", {"gamma": "ess_exact"}), ("is_reshape", {"gamma_granularity": "sequence"}),
        ("is_reshape", {"gamma": 0.5}), ("is_reshape", {"gamma": "psis"}),
        ("is_reshape_sign", {"gamma": "ess_exact"}), ("is_reshape_var", {"gamma": "ess_exact"}),
        ("ppo_clip", {"clip_ratio_c": None}),
    ] + [("is_reshape_sign", {"neg_saturation": s, "pos_weight": p})
         for s in ("none", "soft", "truncate", "michaelis_menten") for p in ("power", "michaelis_menten")]
    specs = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        lp = torch.zeros(4, 37, dtype=dtype, requires_grad=True)
        for adv, mask in ((lp.detach(), torch.ones(4, 37, dtype=torch.bool)), (None, None),
                          (lp.detach(), None), (None, torch.ones(4, 37))):
            for lt, opts in configs + [(lt, {"rollout_log_prob": lp.detach(), "rollout_correction": c})
                                       for lt, c in ROLLOUT_CONFIGS]:
                for s in specs_from_plan(lp, lp.detach(), adv, mask, lt, **opts):
                    specs[spec_key(s)] = s
    for s in sampling_specs():
        specs[spec_key(s)] = s
    return list(specs.values())


def sampling_specs() -> list:
    """Every kernel specialization ``optimal_sampling`` can launch (for the sm_90 AOT check):
    each input dtype × method × reference × log q output, and CONTIG (sizes never specialise)."""
    from ..sampling import plan_sampling, validate

    specs = {}
    layouts = [(dtype, 64) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    for dtype, vocab in layouts + [(torch.float32, 63)]:  # V = 63: the CONTIG=False specialisations
        x = torch.zeros(2, vocab, dtype=dtype)
        for method, ref in (("kl_symmetry", None), ("snr", None), ("snr", x), (0.5, None)):
            for log_q in (False, True):
                config = validate(x, x, method, 1.0, ref, None, log_q)
                for step in plan_sampling(x, x, ref, config, torch.zeros(1, dtype=torch.int64)).steps:
                    spec = launch_spec(step)
                    specs[spec_key(spec)] = spec
    return list(specs.values())


# ----------------------------------------------------------------------------- compiling (no interpreter)

def _kernel(path: str):
    """The ``@triton.jit`` function named ``module:name`` (see ``kernel_path``)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _tools():
    """The ptxas Triton itself uses for sm_90 (it reads Triton's PTX version) and cuobjdump."""
    import triton

    from ..kernels.compat import ptxas

    nvidia = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return Path(ptxas(90).path), nvidia / "cuobjdump"


def _tuples(arg_type):
    """JSON lists of a spec back to the tuples Triton's signatures use."""
    return tuple(_tuples(t) for t in arg_type) if isinstance(arg_type, list) else arg_type


_ENCODING = re.compile(r"\s*/\* 0x[0-9a-f]{16} \*/")


def _listing(tool: Path, *args) -> str:
    """A disassembly without the instruction encodings (``/* 0x... */`` comments)."""
    text = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True).stdout
    return "\n".join(line for line in (_ENCODING.sub("", raw) for raw in text.splitlines()) if line.strip())


def compile_spec(spec: dict, sass: bool = False) -> dict:
    """Compile one specialization for sm_90 and read its resource usage (and, with
    ``sass``, its SASS: ``sass`` from ``cuobjdump -sass``, ``sass_lines`` from ``nvdisasm -g``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(spec["kernel"])
    constexprs = {k: _constexpr(v) for k, v in spec["constexprs"].items()}
    signature = {name: ("constexpr" if name in constexprs else _tuples(spec["signature"][name]))
                 for name in fn.arg_names}
    row = {"kernel": spec["kernel"], "constexprs": spec["constexprs"], "options": spec["options"]}
    if "divisible" in spec:
        row["divisible"] = spec["divisible"]
    try:
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in spec.get("divisible", ())}
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(spec["options"]))
    except Exception as e:  # reported, and failed by the test
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        return row
    ptxas, cuobjdump = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        res = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        # the same ptxas options as Triton's own build of the cubin (-lineinfo, regAllocOptLevel)
        info = subprocess.run([str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                               str(ptx), "-o", str(Path(tmp) / "v.cubin")],
                              capture_output=True, text=True)
        info = info.stdout + info.stderr
        if sass:
            row["sass"] = _listing(cuobjdump, "-sass", cubin)
            row["sass_lines"] = _listing(cuobjdump.parent / "nvdisasm", "-g", "-c", cubin)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    row.update(registers=int(usage.get("REG", -1)), shared_bytes=int(usage.get("SHARED", -1)),
               stack_bytes=int(usage.get("STACK", -1)), local_bytes=int(usage.get("LOCAL", -1)),
               spill_stores=int(spills.group(1)) if spills else -1,
               spill_loads=int(spills.group(2)) if spills else -1,
               num_warps=compiled.metadata.num_warps)
    return row


def compile_specs(specs: list, workers: int = 2, sass: bool = False) -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs a process without TRITON_INTERPRET=1")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(partial(compile_spec, sass=sass), specs))


def run_in_subprocess(specs: list, out: Path, timeout: float = 1500, sass: bool = False) -> list:
    """Compile ``specs`` in a fresh process without the interpreter; returns the report rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(specs, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "isreshape_triton.dev.aot", "--specs", f.name, "--out", str(out)]
                   + (["--sass"] if sass else []), env=env, check=True, timeout=timeout)
    os.unlink(f.name)
    return json.loads(out.read_text())["kernels"]


def write_report(path: Path = REPORT_PATH, specs: list | None = None) -> Path:
    """Compile (by default) ``default_specs()`` and write the JSON report the benchmark shows."""
    path = Path(path)
    run_in_subprocess(specs if specs is not None else default_specs(), path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", help="JSON list of specializations (default: a representative set)")
    ap.add_argument("--out", default=str(REPORT_PATH))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sass", action="store_true", help="add each cubin's SASS listings to its row")
    args = ap.parse_args(argv)
    specs = json.loads(Path(args.specs).read_text()) if args.specs else default_specs()
    rows = compile_specs(specs, args.workers, args.sass)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"target": "cuda sm_90 (H100), warp size 32",
                                          "kernels": rows}, indent=1))
    bad = [r for r in rows if "error" in r or r.get("spill_stores", 0) > 0 or r.get("spill_loads", 0) > 0]
    print(f"compiled {len(rows)} specializations for sm_90; {len(bad)} with errors or spills; "
          f"max registers {max((r.get('registers', 0) for r in rows), default=0)}")


if __name__ == "__main__":
    main()
