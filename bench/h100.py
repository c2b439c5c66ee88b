"""Modelled H100 time of the fused op, per family and shape, read from the sm_90 SASS of every
kernel it launches, beside the eager-PyTorch model and the roofline: a MODEL, not a measurement.

    python -m bench.h100 [--families is_reshape,ppo_clip] [--dtypes fp32,bf16] [--out bench/results]
    python -m bench.h100 --op sampling   # irt.optimal_sampling (bench/sampling.py: sampling_model.md)

(``python -m bench`` runs it too.) Steps:

1. ``trace``: the op runs forward + backward on ``meta`` tensors with ``launch.Launch.__call__``
   replaced by a recorder, so every launch it plans (``launch.plan_launches`` and whatever its
   backward launches) is captured with its grid and arguments at the real shape, and
   ``count_work`` counts its aten glue (launches, bytes). Nothing runs, nothing is allocated.
2. ``compiled``: each launch's specialization (``aot.launch_spec(..., jit_values=True)``: what the
   GPU JIT specializes on) is compiled for sm_90 in a subprocess without ``TRITON_INTERPRET``
   (``aot.run_in_subprocess(..., sass=True)``); rows are cached per specialization and kernel
   source under ``bench/results/sass_cache/``.
3. ``bench/sass_model.py`` parses the SASS (loops, barriers, loads, chains) and models each launch;
   ``launch_work`` says how many tile iterations the busiest program runs.
4. The eager model counts the eager trainer code (``bench/eager.py``) at the same shape on the CPU
   (launches, bytes, syncs) and charges each launch its bytes / HBM bandwidth + the launch overhead.
5. With CUDA, ``triton.testing.do_bench`` times the same steps and the table shows the model's error.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from . import sass_model as sm

RESULTS = Path(__file__).resolve().parent / "results"
CACHE_DIR = RESULTS / "sass_cache"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SHAPES = [(1, 1 << 20), (4, 32768), (16, 4096), (64, 4096), (1024, 4096)]

# The packed case: 64 ragged sequences (seeded lengths in [256, 8192]), as verl's remove-padding /
# OpenRLHF packing hand them over: 1-D [N] tensors plus cu_seqlens.
PACKED_SEQUENCES = 64
PACKED_SEED = 0
# Switch to True once ``fused_policy_loss`` takes 1-D inputs with ``cu_seqlens`` (SPEC §2);
# until then the packed batch is modelled as the padded shape with the same token count.
PACKED_INPUTS = True


@dataclass(frozen=True)
class Case:
    label: str
    R: int  # rows (sequences)
    T: int  # tokens per row (padded form)
    lengths: Optional[tuple] = None  # packed: the sequence lengths

    @property
    def tokens(self) -> int:
        return sum(self.lengths) if self.lengths else self.R * self.T


def packed_lengths() -> tuple:
    g = torch.Generator().manual_seed(PACKED_SEED)
    return tuple(int(x) for x in torch.randint(256, 8193, (PACKED_SEQUENCES,), generator=g))


def packed_case() -> Case:
    """The packed batch of ragged sequences. While ``PACKED_INPUTS`` is False it is modelled as
    the padded shape with the same token count, [S, ceil(N / S)] (see ``case_inputs``)."""
    lengths = packed_lengths()
    S, N = len(lengths), sum(lengths)
    label = f"packed {S} seqs, {N:,} tokens" + ("" if PACKED_INPUTS else f" (as {S}×{math.ceil(N / S)})")
    return Case(label, S, math.ceil(N / S), lengths)


def cases() -> List[Case]:
    return [Case(f"{R} × {T:,}", R, T) for R, T in SHAPES] + [packed_case()]


def case_inputs(case: Case, dtype, device) -> tuple:
    """(log_prob, old_log_prob, advantages, response_mask, extra kwargs) of a case: the bench batch
    (``bench.data.make_batch``: ragged bool masks), [R, T]; for the packed case with
    ``PACKED_INPUTS``, its sequences' tokens as 1-D [N] tensors and ``cu_seqlens``. On ``meta``
    only the shapes and dtypes."""
    from .data import make_batch

    packed = bool(case.lengths) and PACKED_INPUTS
    R, T = (len(case.lengths), max(case.lengths)) if packed else (case.R, case.T)
    if device == "meta":
        shape = (case.tokens,) if packed else (R, T)
        lp, old, adv = (torch.empty(shape, dtype=dtype, device=device) for _ in range(3))
        mask = torch.empty(shape, dtype=torch.bool, device=device)
    else:
        b = make_batch(R, T, dtype=dtype, device=device)
        lp, old, adv, mask = b.log_prob.detach(), b.old_log_prob, b.advantages, b.response_mask
        if packed:  # the first length_s tokens of row s, concatenated
            keep = (torch.arange(T)[None, :] < torch.tensor(case.lengths)[:, None]).to(device)
            lp, old, adv, mask = lp[keep], old[keep], adv[keep], mask[keep]
    extra = {}
    if packed:
        cu = torch.tensor([0, *case.lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
        extra["cu_seqlens"] = cu.to(device)
    return lp.requires_grad_(True), old, adv, mask, extra


# ----------------------------------------------------------------------------- 1. tracing the op

@dataclass
class Trace:
    launches: list  # launch.Launch objects, forward then backward
    aten_launches: int
    aten_bytes: int
    syncs: int


def trace(loss_type: str, case: Case, dtype=torch.float32, options: Optional[dict] = None) -> Trace:
    """Every launch of one forward + backward of the fused op at the case's shape (on meta tensors)."""
    from isreshape_triton import launch, ops
    from isreshape_triton.dev.profiling import count_work

    recorded = []
    original = launch.Launch.__call__
    launch.Launch.__call__ = lambda self: recorded.append(self)
    try:
        lp, old, adv, mask, extra = case_inputs(case, dtype, "meta")
        options = dict(options or {})
        if "rollout_correction" in options:  # the rollout log-probs: a stream like old_log_prob
            options["rollout_log_prob"] = torch.empty_like(old)
        seed = torch.ones((), dtype=dtype, device="meta")
        launch.completion_ticket(lp.device)  # allocated by the first call only: steady state, as in training
        with count_work(track_memory=False) as work:
            loss, _ = ops.fused_policy_loss(lp, old, adv, mask, loss_type, **extra, **options)
            # the gradient itself: on meta tensors AccumulateGrad copies it into .grad, where a real
            # device steals the op's output buffer (no aten op)
            torch.autograd.grad(loss, lp, seed.to(loss.dtype))
    finally:
        launch.Launch.__call__ = original
    return Trace(recorded, work.torch_launches, work.bytes, work.syncs)


# ----------------------------------------------------------------------------- 2. compiling (cached)

def _source_hash() -> str:
    import triton

    import isreshape_triton.kernels as kernels
    from isreshape_triton.dev import aot
    h = hashlib.sha256(triton.__version__.encode())
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")) + [Path(aot.__file__)]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def compiled(specs: List[dict], cache_dir: Path = CACHE_DIR, log=sys.stderr) -> List[dict]:
    """AOT rows with SASS for ``specs`` (compiled in a subprocess, cached per specialization in a
    folder named by the hash of the kernel sources, aot.py and the Triton version)."""
    from isreshape_triton.dev import aot

    source = _source_hash()
    if cache_dir.is_dir():  # rows of older kernel sources are never read again
        for old in cache_dir.iterdir():
            if old.is_dir() and old.name != source:
                shutil.rmtree(old, ignore_errors=True)
    cache_dir = cache_dir / source
    keys = [hashlib.sha256(aot.spec_key(s).encode()).hexdigest()[:24] for s in specs]
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = {k: s for k, s in zip(keys, specs) if not (cache_dir / f"{k}.json").exists()}
    if missing:
        if log:
            log.write(f"bench.h100: compiling {len(missing)} specialization(s) for sm_90 (cached in {cache_dir})\n")
        with tempfile.TemporaryDirectory() as tmp:
            rows = aot.run_in_subprocess(list(missing.values()), Path(tmp) / "rows.json", sass=True)
        for k, row in zip(missing, rows):
            (cache_dir / f"{k}.json").write_text(json.dumps(row))
    return [json.loads((cache_dir / f"{k}.json").read_text()) for k in keys]


_STRUCTURES: Dict[str, sm.KernelStructure] = {}
LAST_PROGRAM_KERNELS = ("token_loss_kernel", )  # one completion ticket per program; the last one finalizes


def structure(row: dict, tile_pattern: str = sm.TILE_LOOP) -> sm.KernelStructure:
    """The kernel's regions (tile loop, piece, item, once) from its SASS (``tile_pattern``: see
    ``sass_model.kernel_structure``)."""
    key = hashlib.sha256((row["sass"] + "\0" + tile_pattern).encode()).hexdigest()
    if key not in _STRUCTURES:
        fns = sm.parse_sass(row["sass"], row.get("sass_lines"))
        name = row["kernel"].split(":")[-1]
        fn = next((f for f in fns if f.name == name), fns[0])
        _STRUCTURES[key] = sm.kernel_structure(fn, tile_pattern, last_program=name in LAST_PROGRAM_KERNELS)
    return _STRUCTURES[key]


# ----------------------------------------------------------------------------- 3. the work of a launch

def _busiest_padded_program(N: int, T: int, chunk: int, n_chunks: int, grid: int, block: int) -> tuple:
    """(pieces, tiles, tokens) of the program with the most tiles, rows of T tokens (chunk c → program c mod grid)."""
    per_program = collections.defaultdict(lambda: np.zeros(3))  # (pieces, tiles, tokens)
    for c in range(n_chunks):
        a, b = c * chunk, min((c + 1) * chunk, N)
        cuts = [a] + list(range((a // T + 1) * T, b, T)) + [b]
        tiles = sum(math.ceil((hi - lo) / block) for lo, hi in zip(cuts, cuts[1:]))
        per_program[c % grid] += (len(cuts) - 1, tiles, b - a)
    return tuple(float(v) for v in max(per_program.values(), key=lambda v: (v[1], v[0])))


def launch_work(launch, kernel: sm.KernelStructure) -> Optional[sm.Work]:
    """Tile iterations of the busiest program of a launch: the one place that knows how the
    kernels split tokens into work items (adjust it when that changes).

    * chunked kernels (arguments ``chunk`` and ``n_chunks``): program p owns chunks p, p + grid, …
      of ``chunk`` tokens; a chunk is cut at row boundaries into pieces, each running
      ceil(length / BLOCK_T) tiles. Padded rows (``T`` > 0): counted exactly for the busiest
      program; packed rows (lengths unknown here): 1 + chunk / mean row length pieces and
      chunk / BLOCK_T + pieces − 1 tiles per chunk. A piece's loads run one tile ahead (its
      prologue loads the first tile, the last iteration's loads are predicated off) and its last
      tile is partial, so the token loads and stores move the chunk's tokens (``Work.moved``; the
      piece's record accesses are not token streams: ``RegionStats.record_bytes``);
    * row-owned kernels (arguments ``R`` and ``T``): a program owns ceil(R / grid) rows of
      ceil(T / BLOCK_T) tiles;
    * kernels without a ``BLOCK_T`` constexpr have no token work (None); one with it must show its
      tile loop in the SASS.
    """
    block = launch.constexprs.get("BLOCK_T")
    if block is None:
        return None
    if kernel.tile is None:  # never model a token kernel as if it had no token work
        raise RuntimeError(f"{kernel.name}: no tile loop found in its SASS")
    grid = int(math.prod(launch.grid))
    args = launch.args
    if "chunk" in args and "n_chunks" in args:
        chunk, n_chunks = int(args["chunk"]), int(args["n_chunks"])
        N = int(args.get("N", chunk * n_chunks))
        T = int(args.get("T", 0))
        items = math.ceil(n_chunks / grid)
        if kernel.levels < 3:  # no piece loop: a chunk is one run of tiles
            pieces, tiles, tokens = 1.0, float(math.ceil(chunk / block)), float(chunk)
        elif T > 0:
            pieces, tiles, tokens = _busiest_padded_program(N, T, chunk, n_chunks, grid, block)
            pieces, tiles, tokens = pieces / items, tiles / items, tokens / items
        else:
            mean_len = max(1.0, N / max(1, int(args.get("S", 1))))
            pieces = min(float(chunk), 1.0 + chunk / mean_len)
            tiles, tokens = math.ceil(chunk / block) + (pieces - 1.0), float(chunk)
        piece = kernel.piece or sm.RegionStats()
        piece_streams = piece.bytes - piece.record_bytes  # its records move at the L2 rate, all of them
        issued = tiles * kernel.tile.bytes + pieces * piece_streams
        moved = tokens / block * kernel.tile.bytes + pieces * max(0, piece_streams - kernel.tile.load_bytes)
        return sm.Work(items, pieces, tiles, min(1.0, moved / issued) if issued else 1.0)
    if "R" in args and "T" in args:
        R, T = int(args["R"]), int(args["T"])
        return sm.Work(math.ceil(R / grid), 1.0, float(math.ceil(T / block)))
    numel = max((v.numel() for v in args.values() if isinstance(v, torch.Tensor)), default=0)
    return sm.Work(1, 1.0, float(math.ceil(numel / grid / block)))


# ----------------------------------------------------------------------------- 4. models

@dataclass
class FusedModel:
    seconds: float
    launches: List[dict]  # per Triton launch: kernel, grid, CTAs/SM, time, bound
    aten_launches: int
    aten_seconds: float
    triton_launches: int

    @property
    def total_launches(self) -> int:
        return self.triton_launches + self.aten_launches


def fused_model(tr: Trace, rows: List[dict], m: sm.H100Model = sm.H100, work=launch_work,
                tile_pattern: str = sm.TILE_LOOP) -> FusedModel:
    """Every launch of ``tr`` modelled from its compiled row; ``work(launch, kernel)`` says how many
    tile iterations its busiest program runs (default: the loss op's ``launch_work``)."""
    out, total = [], 0.0
    for launch, row in zip(tr.launches, rows):
        if "error" in row:
            raise RuntimeError(f"{row['kernel']} does not compile for sm_90: {row['error'][:300]}")
        k = structure(row, tile_pattern)
        cost = sm.launch_time(k, row["registers"], row["num_warps"], max(0, row["shared_bytes"]),
                              int(math.prod(launch.grid)), work(launch, k), m)
        total += cost.seconds
        out.append({"kernel": row["kernel"].split(":")[-1], "grid": cost.grid, "registers": row["registers"],
                    "num_warps": row["num_warps"], "ctas_per_sm": cost.ctas_per_sm, "waves": cost.waves,
                    "us": cost.seconds * 1e6, "bound": cost.bound, "detail": cost.detail})
    aten = tr.aten_bytes / m.achievable_bytes_per_s + tr.aten_launches * m.launch_s
    return FusedModel(total + aten, out, tr.aten_launches, aten, len(tr.launches))


def roofline_bytes(loss_type: str, case: Case, dtype, options: Optional[dict] = None) -> int:
    """SPEC §13 bytes: ``launch.traffic_model`` of the case (bool masks, per-token advantages, as in the
    bench batch; the packed case by its padded stand-in until ``PACKED_INPUTS``), with the
    rollout stream of a ``rollout_correction`` among ``options``."""
    from isreshape_triton.launch import traffic_model

    correction = (options or {}).get("rollout_correction")
    return int(traffic_model(loss_type, dtype, torch.bool, case.R, case.T, "BT", correction=correction))


_EAGER: Dict[str, dict] = {}
EAGER_COUNT_SHAPE = (16, 4096)


def eager_counts(loss_type: str, case: Case) -> dict:
    """Launches, bytes and syncs of the eager trainer code (fp32, bench batch) for the case: counted
    once per family at ``EAGER_COUNT_SHAPE`` on the CPU, bytes scaled by the token count (they are
    per-token streams to within 1 % from 64K to 4M tokens; launches and syncs do not depend on the
    shape, to within a couple of data-dependent branches)."""
    from isreshape_triton.dev.profiling import count_work

    from .eager import EAGER
    if loss_type not in _EAGER:
        R, T = EAGER_COUNT_SHAPE
        lp, old, adv, mask, _ = case_inputs(Case("count", R, T), torch.float32, "cpu")
        with count_work(track_memory=False) as w:
            loss, _ = EAGER[loss_type](lp, old, adv, mask, "token-mean")
            loss.backward(torch.ones(()))
        _EAGER[loss_type] = {"launches": w.launches, "bytes_per_token": w.bytes / (R * T), "syncs": w.syncs}
    c = _EAGER[loss_type]
    return {"launches": c["launches"], "bytes": c["bytes_per_token"] * case.tokens, "syncs": c["syncs"],
            "counted_at": "x".join(map(str, EAGER_COUNT_SHAPE))}


def eager_model(counts: dict, m: sm.H100Model = sm.H100) -> tuple:
    """(low, high) seconds: every launch its bytes / achievable HBM bandwidth + the launch
    overhead; high adds the syncs."""
    low = counts["bytes"] / m.achievable_bytes_per_s + counts["launches"] * m.launch_s
    return low, low + counts["syncs"] * m.sync_s


# ----------------------------------------------------------------------------- 5. GPU timing

def measure_gpu(loss_type: str, case: Case, dtype) -> Optional[dict]:
    """Median fwd+bwd time (``triton.testing.do_bench``) of the fused op and of the eager code."""
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench

    import isreshape_triton as irt

    from .eager import EAGER
    out = {}
    lp, old, adv, mask, extra = case_inputs(case, dtype, "cuda")
    seed = torch.ones((), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device="cuda")

    def fused():
        lp.grad = None
        loss, _ = irt.policy_loss(lp, old, adv, mask, loss_type, **extra)
        loss.backward(seed.to(loss.dtype))

    fused()
    out["fused_us"] = do_bench(fused, return_mode="median") * 1e3
    if dtype == torch.float32:
        lp2, old2, adv2, mask2, _ = case_inputs(Case(case.label, case.R, case.T), dtype, "cuda")

        def eager():
            lp2.grad = None
            loss, _ = EAGER[loss_type](lp2, old2, adv2, mask2, "token-mean")
            loss.backward(seed)

        eager()
        out["eager_us"] = do_bench(eager, return_mode="median") * 1e3
    return out


# ----------------------------------------------------------------------------- the table

@dataclass
class Result:
    family: str
    dtype: str
    case: Case
    fused: FusedModel
    roofline_s: float
    eager: tuple
    eager_counts: dict
    measured: Optional[dict] = None
    kernels: List[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"family": self.family, "dtype": self.dtype, "case": self.case.label, "R": self.case.R,
                "T": self.case.T, "tokens": self.case.tokens, "model_us": self.fused.seconds * 1e6,
                "roofline_us": self.roofline_s * 1e6, "model_over_roofline": self.fused.seconds / self.roofline_s,
                "eager_model_us": [x * 1e6 for x in self.eager], "eager_counts": self.eager_counts,
                "triton_launches": self.fused.triton_launches, "aten_launches": self.fused.aten_launches,
                "launches": self.fused.launches, "measured": self.measured}


def model(configs: List[tuple], case_list: Optional[List[Case]] = None, measure: bool = True,
          log=sys.stderr, cache_dir: Path = CACHE_DIR) -> Dict[str, List[Result]]:
    """The model at every case for each (loss_type, dtype name, options as ((name, value), ...))
    in ``configs``; every specialization the cache lacks is compiled in one subprocess."""
    from isreshape_triton.dev import aot

    case_list = case_list or cases()
    traces = {cfg: [trace(cfg[0], c, DTYPES[cfg[1]], dict(cfg[2])) for c in case_list] for cfg in configs}
    specs = [aot.launch_spec(launch, jit_values=True)
             for trs in traces.values() for tr in trs for launch in tr.launches]
    rows = iter(compiled(specs, cache_dir, log))
    m = sm.H100
    out = {}
    for (loss_type, dtype_name, options), trs in traces.items():
        dtype = DTYPES[dtype_name]
        results = []
        for case, tr in zip(case_list, trs):
            mine = [next(rows) for _ in tr.launches]
            fused = fused_model(tr, mine, m)
            roof = (roofline_bytes(loss_type, case, dtype, dict(options)) / m.hbm_bytes_per_s
                    + fused.total_launches * m.launch_s)
            counts = eager_counts(loss_type, case)
            results.append(Result(loss_type, dtype_name, case, fused, roof, eager_model(counts, m), counts,
                                  measure_gpu(loss_type, case, dtype) if measure else None, mine))
        out[f"{loss_type} ({', '.join([dtype_name] + [f'{k}={v}' for k, v in options])})"] = results
    return out


def _us(x: float) -> str:
    return f"{x * 1e6:,.0f}" if x >= 1e-5 else f"{x * 1e6:.1f}"


def _dominant(fm: FusedModel) -> str:
    worst = max(fm.launches, key=lambda r: r["us"])
    return f"{worst['kernel']} {worst['us']:,.0f} µs ({worst['bound']}, grid {worst['grid']})"


def family_table(results: List[Result]) -> str:
    gpu = any(r.measured for r in results)
    head = ("| shape (rows × tokens) | fused MODEL µs | roofline µs | model / roofline | eager MODEL µs "
            "| fused launches (Triton + aten) | slowest launch (bound) |"
            + (" measured fused µs | model error | measured eager µs |" if gpu else "") + "\n"
            "|---|---|---|---|---|---|---|" + ("---|---|---|" if gpu else "") + "\n")
    lines = []
    for r in results:
        lo, hi = r.eager
        line = (f"| {r.case.label} | {_us(r.fused.seconds)} | {_us(r.roofline_s)} "
                f"| {r.fused.seconds / r.roofline_s:.2f} | {_us(lo)}–{_us(hi)} "
                f"| {r.fused.triton_launches} + {r.fused.aten_launches} | {_dominant(r.fused)} |")
        if gpu:
            meas = r.measured or {}
            f_us = meas.get("fused_us")
            err = "n/a" if not f_us else f"{(r.fused.seconds * 1e6 - f_us) / f_us:+.0%}"
            line += (f" {f_us:,.1f} | {err} | {meas.get('eager_us', float('nan')):,.1f} |" if f_us
                     else " n/a | n/a | n/a |")
        lines.append(line)
    return head + "\n".join(lines) + "\n"


def kernel_table(results: List[Result]) -> str:
    """Per compiled kernel specialization: what its SASS says per tile-loop iteration."""
    seen, lines = set(), []
    head = ("| family | kernel | regs | warps | CTAs/SM | tile loop | instr. / iter | BAR / iter | SHFL / iter "
            "| MUFU / iter | loads / iter (B each) | stores / iter | dependent-load chain | memory waits / iter "
            "| BAR in innermost loops |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in results:
        for row in r.kernels:
            k = structure(row)
            occ = sm.ctas_per_sm(row["registers"], row["num_warps"], max(0, row["shared_bytes"]))
            t = k.tile
            bars = sum(lp.stats.bar for lp in k.innermost())
            widths = ",".join(str(w) for w in sorted(set(t.load_widths))) if t else ""
            cells = ([k.tile_source, t.instructions, t.bar, t.shfl, t.mufu, f"{t.global_loads} ({widths})",
                      t.global_stores, t.load_chain, t.mem_waits] if t else ["— (no tile loop)"] + [""] * 8)
            line = (f"| {r.family} ({r.dtype}) | {k.name} | {row['registers']} | {row['num_warps']} | {occ} | "
                    + " | ".join(str(c) for c in cells) + f" | {bars} |")
            if line not in seen:  # specializations that differ only in JIT constants look alike
                seen.add(line)
                lines.append(line)
    return head + "\n".join(lines) + "\n"


def summary_table(all_results: Dict[str, List[Result]]) -> str:
    """Modelled fused time (× roofline) per shape and family, and the eager model's range."""
    keys = list(all_results)
    first = all_results[keys[0]]
    head = ("| shape | " + " | ".join(k.split(" (")[0] for k in keys) + " |\n"
            + "|---|" + "---|" * len(keys) + "\n")
    lines = []
    for i, case in enumerate(r.case for r in first):
        cells = []
        for k in keys:
            r = all_results[k][i]
            cells.append(f"{_us(r.fused.seconds)} ({r.fused.seconds / r.roofline_s:.1f}×); "
                         f"eager {_us(r.eager[0])}–{_us(r.eager[1])}")
        lines.append(f"| {case.label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


ACCEPT_RATIO = 1.5


def acceptance(results: List[Result]) -> tuple:
    """(verdict, the shapes that miss): SPEC §13's bar for one family."""
    misses = [r.case.label for r in results
              if not (r.fused.seconds <= ACCEPT_RATIO * r.roofline_s and r.fused.seconds < r.eager[0])]
    return ("PASS" if not misses else "FAIL"), misses


def acceptance_text(all_results: Dict[str, List[Result]]) -> str:
    lines = ["| family | verdict | worst model / roofline | shapes that miss |", "|---|---|---|---|"]
    for key, results in all_results.items():
        verdict, misses = acceptance(results)
        worst = max(r.fused.seconds / r.roofline_s for r in results)
        lines.append(f"| {key} | {verdict} | {worst:.2f} | {', '.join(misses) or '—'} |")
    return "\n".join(lines) + "\n"


def render(all_results: Dict[str, List[Result]]) -> str:
    parts = ["## Modelled H100 time (a MODEL, not a measurement)\n",
             "Fused op forward + backward (`token-mean`, default options) per family, modelled from the sm_90 "
             "SASS of every kernel it launches (`bench/sass_model.py`, `bench/h100.py`), beside the roofline "
             "(SPEC §13) and the eager trainer code's model. Assumptions:\n", "```", sm.assumptions_text(), "```\n"]
    if not PACKED_INPUTS:
        parts.append("The packed case is modelled as the padded shape with the same token count "
                     "(`bench.h100.PACKED_INPUTS = False` until the op takes `cu_seqlens`).\n")
    if any(r.measured for rs in all_results.values() for r in rs):
        parts.append(f"Measured on {torch.cuda.get_device_name()}: `triton.testing.do_bench` medians of the same "
                     "forward + backward; model error = model / measured − 1.\n")
    parts.append("### Summary: fused MODEL µs (× roofline); eager MODEL µs\n")
    parts.append(summary_table(all_results))
    parts.append(f"### Acceptance (SPEC §13): model ≤ {ACCEPT_RATIO} × roofline and below the eager model's low end "
                 "at every shape\n")
    parts.append(acceptance_text(all_results))
    for key, results in all_results.items():
        parts.append(f"### {key}\n")
        parts.append(family_table(results))
    parts.append("### What the SASS says (per tile-loop iteration of each kernel specialization)\n")
    parts.append(kernel_table([r for rs in all_results.values() for r in rs]))
    return "\n".join(parts)


def plot(all_results: Dict[str, List[Result]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(all_results)
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        res = all_results[key]
        xs = range(len(res))
        ax.plot(xs, [r.fused.seconds * 1e6 for r in res], "o-", c="#2ca02c", label="fused (model)")
        ax.plot(xs, [r.roofline_s * 1e6 for r in res], "k--", lw=1, label="roofline")
        ax.fill_between(xs, [r.eager[0] * 1e6 for r in res], [r.eager[1] * 1e6 for r in res],
                        color="#d62728", alpha=0.3, label="eager (model)")
        if any(r.measured for r in res):
            ax.plot(xs, [(r.measured or {}).get("fused_us", float("nan")) for r in res], "x",
                    c="#1f77b4", label="fused (measured)")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.case.label.split(" (")[0].replace(" seqs, ", "\n") for r in res],
                           rotation=35, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_ylabel("µs (fwd+bwd)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("MODELLED H100 time from the sm_90 SASS (not a measurement)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(families: Optional[List[str]] = None, dtypes=("fp32",), out: Optional[Path] = RESULTS,
        measure: bool = True, log=sys.stderr) -> tuple:
    """Model every family (default options) at every case; writes model.json / model.png under
    ``out``; returns (markdown section, results)."""
    import isreshape_triton as irt

    configs = [(fam, dtype_name, ()) for dtype_name in dtypes for fam in families or irt.LOSS_TYPES]
    all_results = model(configs, measure=measure, log=log)
    text = render(all_results)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"note": "MODEL, not a measurement", "assumptions": sm.assumptions_text(),
                   "results": {k: [r.as_dict() for r in v] for k, v in all_results.items()}}
        (out / "model.json").write_text(json.dumps(payload, indent=1, default=str))
        try:
            plot(all_results, out / "model.png")
        except ImportError:
            pass
    return text, all_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.h100", description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=None)
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--op", choices=("loss", "sampling"), default="loss")
    args = ap.parse_args(argv)
    if args.op == "sampling":
        from .sampling import h100_model, write_model

        print(write_model(*h100_model(), out_dir=args.out))
        return 0
    fams = [f for f in args.families.split(",") if f] if args.families else None
    text, _ = run(fams, [d for d in args.dtypes.split(",") if d], Path(args.out))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
