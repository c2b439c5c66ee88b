"""Launch planning of the fused op: the work-item geometry, the tiles, the buffers and the
kernel launches of the forward pass (``plan_launches``) and of the backward
(``backward_launch``), and the bytes they move (``traffic_model``). Nothing here runs a
kernel: a plan is a list of ``Launch`` objects (also read by ``dev.aot``).

Work items (SPEC §13): the N tokens (R·T padded, or packed with ``cu_seqlens``)
are split into chunks of ``chunk`` tokens (512…4096, chosen from N only), walked
by a persistent grid of min(#chunks, MAX_PROGRAMS) programs, so one long row
fills the GPU like many short ones. Float parameters reach the kernels as fp32
scalars (Triton's scalar ABI), also for fp64 inputs, whose arithmetic is fp64.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import triton.language as tl

from .families import kernel_family
from .family import GammaRule, KernelFamily
from .inputs import Inputs, per_token_advantages
from .kernels import finalize as kfin
from .kernels import gamma as kg
from .kernels import layout
from .kernels import rollout as kro
from .kernels import select as ksel
from .kernels.backward import policy_grad_kernel
from .kernels.loss import token_loss_kernel
from .kernels.stats import batch_stats_kernel
from .options import fp32
from .params import AGG_MODES, NO_CORRECTION, AggConfig, KLConfig, make_params

_AGG_CODE = {name: i for i, name in enumerate(AGG_MODES)}
assert _AGG_CODE["seq-mean-token-mean"] == kfin.SEQ_MEAN_TOKEN_MEAN.value
SEQ_AGG_MODES = {"seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
ESS_GRID_POINTS = 32  # G of the ess_exact grid (cubic Hermite refinement inside the bracket)
BLOCK_REC = 256  # records merged per vector step (ess_exact grids: BLOCK_REC // G per step)
BLOCK_ELEMENTS = 256  # head/tail elements per step of the finalizer's segmented scan


@dataclass(frozen=True)
class Tiling:
    """Work-item geometry: chunk sizes and the persistent grid (SPEC §13). The chunk is
    the smallest power of two in [chunk_min, chunk_max] giving at most max_programs
    chunks, so small batches still split into ≥ 2×132 work items when they can."""

    max_programs: int = 264  # 2 × 132 SMs; also the number of partial records
    chunk_min: int = 512
    chunk_max: int = 4096

    def chunk(self, n_tokens: int) -> int:
        c = self.chunk_min
        while c < self.chunk_max and c * self.max_programs < n_tokens:
            c *= 2
        return c


TILING = Tiling()

# Tile sizes (tokens) and warps per kernel, by compute dtype, fixed so that no size
# change ever compiles a new kernel. No software pipelining (num_stages=1): the tile
# loops carry lane accumulators, and pipelining costs minutes of compile time. Each
# choice is spill-free on sm_90 (``python -m isreshape_triton.dev.aot``, tests/test_zz_aot.py).
# (with 8 warps ptxas aims at 64 registers and spills a few bytes unless maxnreg lets it take more)
STATS_TILE = {False: (1024, dict(num_warps=8, maxnreg=128)), True: (512, dict(num_warps=8, maxnreg=255))}
STATS_TILE_ESS_EXACT = {False: (16, dict(num_warps=8, maxnreg=128)), True: (16, dict(num_warps=8, maxnreg=255))}
LOSS_WARPS = 8  # every loss tile: the partial buffer holds a record per warp (finalize.reduce_record)
LOSS_TILE = {False: (512, dict(num_warps=LOSS_WARPS, maxnreg=128)),
             True: (256, dict(num_warps=LOSS_WARPS, maxnreg=255))}
# seq-* modes keep three more lane accumulators (the piece's row sums): one token per thread
LOSS_TILE_NARROW = {False: (256, dict(num_warps=LOSS_WARPS, maxnreg=128)),
                    True: (256, dict(num_warps=LOSS_WARPS, maxnreg=255))}
GRAD_TILE = {False: (1024, dict(num_warps=4)), True: (1024, dict(num_warps=4))}


def _tile(table: dict, fp64: bool):
    """(BLOCK_T, launch options) of a kernel for fp32 or fp64 compute."""
    block, options = table[fp64]
    return block, {**options, "num_stages": 1}


_INTERPRETER_LOCK = threading.Lock()


@dataclass
class Launch:
    """One kernel launch: grid, arguments, constexprs and options (also used by ``aot``)."""

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    options: dict

    def __call__(self):
        if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter is not thread-safe
            with _INTERPRETER_LOCK:
                self.kernel[self.grid](**self.args, **self.constexprs, **self.options)
        else:
            self.kernel[self.grid](**self.args, **self.constexprs, **self.options)


_TICKETS: dict = {}
_TICKETS_LOCK = threading.Lock()


def completion_ticket(device: torch.device) -> torch.Tensor:
    """The int32 ticket of the loss kernel's completion count: zero between launches (the
    last program resets it), one per device and stream (per thread on the CPU), so
    concurrent launches on different streams never share one; allocated once."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else threading.get_ident()
    key = (str(device), stream)
    with _TICKETS_LOCK:
        if key not in _TICKETS:
            _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return _TICKETS[key]


@dataclass
class Plan:
    steps: list  # Launch objects, and the all-gather of the records with a process group
    loss: torch.Tensor
    metrics: torch.Tensor
    neg_phi: Optional[torch.Tensor]  # −m·φ per token (flat, virtual token order)
    grad_scale: torch.Tensor
    row_count: torch.Tensor
    geometry: dict  # N, T, S, chunk, n_chunks, grid (for the backward launch and tests)


def empty_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write (tests replace this with a NaN-poisoned fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _streams(x: Inputs) -> dict:
    """Pointer and (row, token) strides of every token stream. Padded: [R, T] strides.
    Packed: row stride 0 and the token stride, or for [S] advantages the reverse."""
    lp = x.log_prob

    def strides(t, per_row=False):
        if t is None:
            return lp, 0, 0
        if not x.packed:
            return t, t.stride(0), t.stride(1)
        return (t, t.stride(0), 0) if per_row else (t, 0, t.stride(0))

    adv = x.advantages
    per_row_adv = adv is not None and x.packed and adv.shape[0] != lp.shape[0]
    out = {}
    for name, (t, rs, ts) in (("lp", strides(lp)), ("olp", strides(x.old_log_prob)),
                              ("adv", strides(adv, per_row_adv)), ("mask", strides(x.response_mask)),
                              ("rollout", strides(x.rollout)), ("ref", strides(x.ref_log_prob))):
        out.update({f"{name}_ptr": t, f"s_{name}_r": rs, f"s_{name}_t": ts})
    return out


def _unit_token_stride(x: Inputs, streams: dict) -> bool:
    """Every token stream given has token stride 1 in ``_streams(x)`` (the kernels then add token
    indices to row addresses instead of multiplying them by a stride); [S] advantages do not."""
    return all(streams[f"s_{name}_t"] == 1 for name, t in (
        ("lp", x.log_prob), ("olp", x.old_log_prob), ("adv", x.advantages), ("mask", x.response_mask),
        ("rollout", x.rollout), ("ref", x.ref_log_prob)) if t is not None)


def geometry(x: Inputs, tiling: Tiling = None) -> dict:
    """N, T, S, the chunk size, the number of chunks and the grid for these inputs."""
    tiling = tiling or TILING
    if x.packed:
        N, T, S = x.log_prob.shape[0], 0, x.rows
    else:
        (S, T), N = x.log_prob.shape, x.log_prob.numel()
    chunk = tiling.chunk(N)
    n_chunks = -(-N // chunk)
    return dict(N=N, T=T, S=S, chunk=chunk, n_chunks=n_chunks,
                grid=max(1, min(n_chunks, tiling.max_programs)))


def plan_launches(x: Inputs, fam: KernelFamily, agg: AggConfig, clamp: float, write_grad: bool,
                  gamma: Optional[torch.Tensor] = None, process_group=None,
                  kl: KLConfig = KLConfig(), correction: tuple = NO_CORRECTION) -> Plan:
    """Allocate the outputs and list the steps of the forward pass: 1-2 kernel launches (pass 1
    for a family's statistics or a rollout correction's row quantity), plus one all-gather of the
    statistics records with ``process_group``, after a token selection's steps.

    ``gamma``: PSIS's (c0, c1) computed on the device beforehand, shape [2] for the batch or
    [rows, 2] per row; a family's token selection plans its own [5] context first (3 launches
    and a sort, ``selection.py``). ``correction``: the rollout correction's
    (CORRECTION, floats) (``params.correction_args``); then ``x.rollout`` holds log π_rollout.
    """
    dev = x.log_prob.device
    acc = acc_dtype(x.log_prob.dtype)
    fp64 = acc == torch.float64
    geo = geometry(x)
    N, S, n_chunks, programs = geo["N"], geo["S"], geo["n_chunks"], geo["grid"]
    G = ESS_GRID_POINTS if fam.ess_exact else 2
    KS = layout.S_BASE_WIDTH + (8 * G if fam.ess_exact else 0)
    batch_stats = fam.needs_stats and not fam.per_row
    row_stats = fam.needs_stats and fam.per_row
    seq_agg = agg.loss_agg_mode in SEQ_AGG_MODES
    code = correction[0] if x.rollout is not None else 0
    corr_rows = kro.per_row(code)  # a row quantity of the rollout correction: pass 1 sums it
    empty = torch.empty(0, device=dev, dtype=acc)
    stats = empty
    corr_rec = empty_buffer((2 * n_chunks + S, layout.CORR_WIDTH.value), acc, dev) if corr_rows else empty
    if row_stats:
        stats = empty_buffer((2 * n_chunks + S, KS), acc, dev)
    elif batch_stats:  # distributed: a fixed number of records per rank, unused ones neutral (n = 0)
        stats = (empty_buffer((programs, KS), acc, dev) if process_group is None
                 else torch.zeros((TILING.max_programs, KS), device=dev, dtype=acc))
    neg_phi = empty_buffer((N,), acc, dev) if write_grad else None
    elements = empty_buffer((2 * n_chunks, layout.ELEMENT_WIDTH.value), acc, dev) if seq_agg else empty
    row_count = empty_buffer((S,), acc, dev) if seq_agg else empty
    # a program's row: its merged record, then its warps' records (reduce_record's scratch)
    partial = empty_buffer((programs, layout.partial_row(LOSS_WARPS)), acc, dev)
    loss = empty_buffer((), acc, dev)
    metrics = empty_buffer((layout.METRIC_WIDTH.value,), acc, dev)
    grad_scale = empty_buffer((1,), acc, dev)
    cu = x.cu_seqlens if x.packed else empty

    streams = _streams(x)
    tokens = dict(**streams, cu_ptr=cu, N=N, T=geo["T"], S=S, chunk=geo["chunk"], n_chunks=n_chunks,
                  clamp=float(clamp), gamma_rule=(fam.gamma_rule or GammaRule()).as_tuple(),
                  corr=tuple(float(v) for v in correction[1]))
    flags = dict(ACC=_tl_dtype(x.log_prob.dtype), UNIT_STRIDE=_unit_token_stride(x, streams),
                 HAS_ADV=x.advantages is not None,
                 HAS_MASK=x.response_mask is not None, HAS_ROLLOUT=x.rollout is not None,
                 CORRECTION=code, PACKED=x.packed, KS=KS, G=G)
    device = device_functions(fam.name)
    steps = []
    select = getattr(device, "select", None)
    if select is not None:
        gamma, selection = _selection_steps(x, fam, select, flags, clamp, programs)
        steps += selection
    if fam.needs_stats or corr_rows:
        block, options = _tile(STATS_TILE_ESS_EXACT if fam.ess_exact else STATS_TILE, fp64)
        # pass 1 reads the rollout stream only where the weights enter a row weight (W), not a γ rule,
        # where a correction's rejection leaves the count mask, or for the correction's row records
        in_row = x.rollout is not None and fam.rollout_in_row
        pass1 = {**flags, "HAS_ROLLOUT": in_row or kro.reject_kind(code) != 0 or corr_rows, "ROLLOUT_IN_ROW": in_row}
        steps.append(Launch(batch_stats_kernel, (programs,),
                            dict(**tokens, rec_ptr=stats, corr_ptr=corr_rec, scratch_ptr=partial,
                                 scratch_stride=partial.stride(0), params=fam.params),
                            dict(**pass1, HAS_REF=False, SIGN_GROUPS=fam.sign_groups, ESS_EXACT=fam.ess_exact,
                                 FAMILY_STATS=fam.needs_stats, ROW_STATS=row_stats,
                                 ROW_TERM=getattr(device, "row_term", None),
                                 WARPS=_lane_warps(block, options), BLOCK_T=block),
                            options))
    records = stats
    if batch_stats and process_group is not None:
        world = torch.distributed.get_world_size(process_group)
        records = torch.empty((world * TILING.max_programs, KS), device=dev, dtype=acc)
        steps.append(functools.partial(torch.distributed.all_gather_into_tensor, records, stats,
                                       group=process_group))

    def given(v):  # a device tensor is read by the kernel (no sync); None: derive it
        return v if isinstance(v, torch.Tensor) else (-1.0 if v is None else float(v))

    block, options = _tile(LOSS_TILE_NARROW if seq_agg else LOSS_TILE, fp64)
    kl_type = kl.code if x.ref_log_prob is not None else 0
    steps.append(Launch(
        token_loss_kernel, (programs,),
        dict(**tokens, stats_ptr=records, n_stats=records.shape[0] if batch_stats else 0, corr_ptr=corr_rec,
             gamma_ptr=gamma if gamma is not None else grad_scale,
             gamma_row_stride=2 if gamma is not None and gamma.dim() == 2 else 0,
             neg_phi_ptr=neg_phi if write_grad else grad_scale, element_ptr=elements,
             row_count_ptr=row_count, partial_ptr=partial, partial_stride=partial.stride(0),
             ticket_ptr=completion_ticket(dev),
             loss_ptr=loss, metrics_ptr=metrics, grad_scale_ptr=grad_scale, params=fam.params,
             kl_coef=float(kl.kl_coef), agg_mode=_AGG_CODE[agg.loss_agg_mode],
             dp_size=float(agg.dp_size), global_token_count=given(agg.global_token_count),
             global_batch_size=given(agg.global_batch_size),
             loss_scale_factor=given(agg.loss_scale_factor)),
        dict(**flags, **_family_constexprs(fam, device), KL_TYPE=kl_type,
             BATCH_STATS=batch_stats, ROW_STATS=row_stats, SIGN_GROUPS=fam.sign_groups,
             WRITE_GRAD=write_grad, SEQ_AGG=seq_agg,
             COUNTS_ON_DEVICE=(isinstance(agg.global_token_count, torch.Tensor)
                               + 2 * isinstance(agg.global_batch_size, torch.Tensor)),
             SEQ_GAMMA=fam.per_row and not fam.row_weight,
             SLOTS=layout.partial_slots(fam.sign_groups, not batch_stats, kl_type != 0,
                                        fam.gamma_stats, seq_agg, fam.extra_terms, code != 0),
             WARPS=LOSS_WARPS, BLOCK_REC=BLOCK_REC, BLOCK_T=block,
             BLOCK_P=max(_pow2(TILING.max_programs), 32 * LOSS_WARPS),  # a lane per thread at least
             BLOCK_E=BLOCK_ELEMENTS),
        options))
    return Plan(steps, loss, metrics, neg_phi, grad_scale, row_count, geo)


SELECT_TILE = {False: (1024, dict(num_warps=8)), True: (512, dict(num_warps=8))}  # 16-byte stores per thread


def fp32_parts(value: float) -> tuple:
    """Three fp32 values whose sum in fp64 is the double ``value`` exactly (the selection's ratio
    reaches the kernel through Triton's fp32 scalars; k = ⌊n·ratio⌋ is computed in fp64)."""
    parts = []
    for _ in range(3):
        part = fp32(value)
        parts.append(part)
        value -= part
    return tuple(parts)


def _selection_steps(x: Inputs, fam: KernelFamily, select, flags: dict, clamp: float, programs: int) -> tuple:
    """(context, steps) of a family's token selection (``selection.py``): the statistics, every
    token's key, a stable sort of the keys (torch, on the device) and the k-th key and position,
    into the [5] context the loss pass reads."""
    dev, acc = x.log_prob.device, acc_dtype(x.log_prob.dtype)
    if x.packed and x.advantages is not None and x.advantages.shape[0] != x.log_prob.shape[0]:
        x = Inputs(x.log_prob, x.old_log_prob, per_token_advantages(x), x.response_mask, x.shape, x.cu_seqlens)
    streams = {k: v for k, v in _streams(x).items() if "rollout" not in k and "ref" not in k}
    N = x.log_prob.numel()
    T = 0 if x.packed else x.log_prob.shape[1]
    sums = empty_buffer((programs, ksel.SUM_FIELDS.value), acc, dev)
    keys = empty_buffer((N,), acc, dev)
    ordered = (empty_buffer((N,), acc, dev), torch.empty((N,), dtype=torch.int64, device=dev))
    context = empty_buffer((5,), acc, dev)
    block, options = _tile(SELECT_TILE, acc == torch.float64)
    tokens = dict(**streams, N=N, T=T, clamp=float(clamp))
    flat = all(streams[f"s_{name}_t"] == 1 and (x.packed or streams[f"s_{name}_r"] == T)
               for name, t in (("lp", x.log_prob), ("olp", x.old_log_prob), ("adv", x.advantages),
                               ("mask", x.response_mask)) if t is not None)
    common = dict(ACC=flags["ACC"], HAS_ADV=flags["HAS_ADV"], HAS_MASK=flags["HAS_MASK"], FLAT=flat, BLOCK_T=block)
    block_p = max(_pow2(programs), 32)
    steps = [Launch(ksel.selection_sums_kernel, (programs,), dict(**tokens, sums_ptr=sums), common, options),
             Launch(ksel.selection_keys_kernel, (programs,),
                    dict(**tokens, sums_ptr=sums, n_parts=programs, ctx_ptr=context, key_ptr=keys, params=fam.params),
                    dict(**common, SELECT=select, BLOCK_P=block_p), options),
             functools.partial(torch.sort, keys, stable=True, out=ordered),
             Launch(ksel.selection_threshold_kernel, (1,),
                    dict(sums_ptr=sums, n_parts=programs, ratio=fp32_parts(fam.select_ratio),
                         sorted_ptr=ordered[0], order_ptr=ordered[1], ctx_ptr=context, N=N),
                    dict(BLOCK_P=block_p), {"num_warps": 1, "num_stages": 1})]
    return context, steps


_GAMMA_MODE_CODE = {"fixed": kg.GAMMA_FIXED.value, "ess": kg.GAMMA_ESS.value, "ess_exact": kg.GAMMA_ESS_EXACT.value,
                    "psis": kg.GAMMA_GIVEN.value, "given": kg.GAMMA_GIVEN.value}


@functools.cache
def device_functions(name: str):
    """Family ``name``'s device module (``kernels/families/<name>.py``)."""
    return importlib.import_module(f"{__package__}.kernels.families.{name}")


def _family_constexprs(fam: KernelFamily, device) -> dict:
    """The loss kernel's family constexprs: its device functions (``device``:
    ``token``, ``row_weight`` and ``select`` where it has them), OPT, its per-token extras, the groups of
    its γ rule and its mode."""
    groups = kg.GROUPS_NONE if fam.gamma_rule is None else kg.GROUPS_SIGN if fam.sign_groups else kg.GROUPS_ALL
    return dict(TOKEN=device.token, OPT=fam.opt, ROW_WEIGHT=device.row_weight if fam.row_weight else None,
                SELECT=getattr(device, "select", None),
                ROLLOUT_IN_ROW=fam.rollout_in_row, GROUPS=groups.value, GAMMA_STATS=fam.gamma_stats,
                TOKEN_EXTRAS=fam.token_extras, GAMMA_MODE=_GAMMA_MODE_CODE[fam.gamma_mode])


def _lane_warps(block: int, options: dict) -> int:
    """The warps of a launch whose [block] lane vectors can be merged per warp (one lane per
    thread and repeat: ``common.group_sum``), else 0."""
    warps = options["num_warps"]
    return warps if block % (32 * warps) == 0 else 0


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def backward_launch(neg_phi: torch.Tensor, grad: torch.Tensor, grad_scale: torch.Tensor,
                    grad_out: torch.Tensor, row_count: torch.Tensor, cu: Optional[torch.Tensor],
                    geo: dict, per_row: bool) -> Launch:
    """The one backward launch: grad = −m·φ · s · grad_out (÷ n_b per row for seq-mean-token-mean)."""
    block, options = _tile(GRAD_TILE, neg_phi.dtype == torch.float64)
    return Launch(policy_grad_kernel, (geo["grid"],),
                  dict(neg_phi_ptr=neg_phi, grad_ptr=grad, grad_scale_ptr=grad_scale, grad_out_ptr=grad_out,
                       row_count_ptr=row_count if per_row else grad_scale,
                       cu_ptr=cu if cu is not None else grad_scale,
                       N=geo["N"], T=geo["T"], S=geo["S"], chunk=geo["chunk"], n_chunks=geo["n_chunks"]),
                  dict(PER_ROW=per_row, PACKED=cu is not None, BLOCK_T=block), options)


def traffic_model(loss_type: str, dtype: torch.dtype, mask_dtype: Optional[torch.dtype], B: int, T: int,
                  adv_shape: str = "BT", params=None, backward: bool = True, split: bool = False,
                  correction=None):
    """Tensor bytes the fused op moves for a [B, T] batch (forward + backward), counting
    every tensor once per kernel that reads or writes it.

    Per token: the loss pass reads every input once and the statistics pass (families with
    statistics) reads them again, advantages only where it needs them (the sign family's
    groups); the loss pass writes −m·φ in fp32 (fp64 for fp64); the backward reads it and
    writes the gradient in log_prob's dtype. Plus the O(B + chunks + programs) record,
    element and partial buffers. adv_shape: "BT", "B" or "none". ``split=True`` returns
    (per-token streams, buffers) instead of their sum. ``correction``: a ``RolloutCorrection``
    (its rollout log-probs, read by the loss pass and by pass 1 where it rejects tokens or sums
    rows; a row quantity runs pass 1 for a family without statistics, with its records). A token
    selection reads the batch twice, writes the keys, and its sort reads them and writes the
    sorted keys and int64 positions (as ``dev.profiling`` counts a torch op: its inputs and
    outputs once; CUB's radix sort makes about four passes over keys and positions, uncounted).
    """
    params = make_params(loss_type, params)
    fam = kernel_family(loss_type, params)
    item = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    n = B * T
    adv_bytes = {"BT": item * n, "B": item * B, "none": 0}[adv_shape]
    mask_bytes = 0 if mask_dtype is None else torch.empty((), dtype=mask_dtype).element_size() * n
    streams = 2 * item * n + adv_bytes + mask_bytes  # loss pass
    chunk = TILING.chunk(n)
    n_chunks = -(-n // chunk)
    programs = max(1, min(n_chunks, TILING.max_programs))
    if fam.needs_stats:
        streams += 2 * item * n + (adv_bytes if fam.sign_groups else 0) + mask_bytes
    corr_rows = correction is not None and correction.per_row
    if correction is not None:
        streams += item * n  # the loss pass
        if corr_rows and not fam.needs_stats:  # pass 1 for the row records alone
            streams += 2 * item * n + mask_bytes
        if (fam.needs_stats or corr_rows) and (corr_rows or correction.reject is not None or fam.rollout_in_row):
            streams += item * n  # pass 1 reads the rollout stream
    if fam.select_ratio:  # the selection (``selection.py``): two passes over the batch, the keys, their sort
        streams += 2 * (2 * item * n + adv_bytes + mask_bytes) + acc * n + (2 * acc + 8) * n
    if backward:
        streams += acc * n + acc * n + item * n
    # statistics records (written once, read by every program or by each piece of the row),
    # partials (written, read), seq elements (written, read), row counts, outputs
    records = 0
    # row records: one per piece = rows + chunk boundaries that cut a row
    pieces = B + max(n_chunks - 1, 0) - (max(n - 1, 0) // math.lcm(chunk, T) if T else 0)
    if fam.needs_stats:
        ks = layout.S_BASE_WIDTH + (8 * ESS_GRID_POINTS if fam.ess_exact else 0)
        records = 2 * (pieces if fam.per_row else programs) * ks
    if corr_rows:  # the correction's records: written once, read by the row's pieces
        records += 2 * pieces * layout.CORR_WIDTH.value
    # a program's partial row: its record and its warps' (written and read once each)
    buffers = acc * (records + 2 * programs * layout.partial_row(LOSS_WARPS)
                     + 2 * 2 * n_chunks * layout.ELEMENT_WIDTH.value + 2 * B + 2 + layout.METRIC_WIDTH.value)
    return (streams, buffers) if split else streams + buffers
