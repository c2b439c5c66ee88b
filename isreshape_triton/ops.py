"""The fused op: ``fused_policy_loss`` = validation + ``plan_launches`` + a thin
autograd Function.

Forward: ``batch_stats_kernel`` (only families whose γ or weight needs batch or
row statistics) and ``token_loss_kernel`` (φ, F, −m·φ, metric partials; its last
program finalizes the loss, the metrics and the gradient scale). Backward:
``policy_grad_kernel``, grad = (−m·φ)·s·grad_out, in log_prob's dtype. So 1 or
2 launches forward, 1 backward, no host sync: every count, γ and denominator
stays on the device, also for ``gamma="psis"``, whose smoothing runs as torch
ops before the loss pass.

Work items (SPEC §13): the N tokens (R·T padded, or packed with ``cu_seqlens``)
are split into chunks of ``chunk`` tokens (512…4096, chosen from N only), walked
by a persistent grid of min(#chunks, MAX_PROGRAMS) programs, so one long row
fills the GPU like many short ones. Float parameters reach the kernels as fp32
scalars (Triton's scalar ABI), also for fp64 inputs, whose arithmetic is fp64.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import triton.language as tl

from .families import ESS_GRID_POINTS, GammaRule, KernelFamily, kernel_family
from .inputs import Inputs, pad_packed, prepare_inputs
from .kernels import finalize as kfin
from .kernels import layout
from .kernels.backward import policy_grad_kernel
from .kernels.families import IS_RESHAPE_VAR, VESPO
from .kernels.loss import token_loss_kernel
from .kernels.stats import batch_stats_kernel
from .metrics import metric_names
from .params import (AGG_MODES, KL_TYPES, AggConfig, KLConfig, as_number, check_log_ratio_clamp,
                     check_process_group, kl_config, make_params)
from .psis import K_HAT_THRESHOLD, psis_gamma

_AGG_CODE = {name: i for i, name in enumerate(AGG_MODES)}
assert _AGG_CODE["seq-mean-token-mean"] == kfin.SEQ_MEAN_TOKEN_MEAN.value
_SEQ_AGG = {"seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
_METRIC_INDEX = {name: i for i, name in enumerate(layout.METRIC_SLOTS)}
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


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write (tests replace this with a NaN-poisoned fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
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
                  kl: KLConfig = KLConfig()) -> Plan:
    """Allocate the outputs and list the steps of the forward pass: 1-2 kernel launches,
    plus one all-gather of the statistics records with ``process_group``.

    ``gamma``: the (c0, c1) context computed on the device beforehand (PSIS), shape
    [2] for the batch or [rows, 2] per row.
    """
    dev = x.log_prob.device
    acc = _acc_dtype(x.log_prob.dtype)
    fp64 = acc == torch.float64
    geo = geometry(x)
    N, S, n_chunks, programs = geo["N"], geo["S"], geo["n_chunks"], geo["grid"]
    G = ESS_GRID_POINTS if fam.ess_exact else 2
    KS = layout.S_BASE_WIDTH + (8 * G if fam.ess_exact else 0)
    batch_stats = fam.needs_stats and not fam.per_row
    row_stats = fam.needs_stats and fam.per_row
    seq_agg = agg.loss_agg_mode in _SEQ_AGG
    empty = torch.empty(0, device=dev, dtype=acc)
    stats = empty
    if row_stats:
        stats = _empty((2 * n_chunks + S, KS), acc, dev)
    elif batch_stats:  # distributed: a fixed number of records per rank, unused ones neutral (n = 0)
        stats = (_empty((programs, KS), acc, dev) if process_group is None
                 else torch.zeros((TILING.max_programs, KS), device=dev, dtype=acc))
    neg_phi = _empty((N,), acc, dev) if write_grad else None
    elements = _empty((2 * n_chunks, layout.ELEMENT_WIDTH.value), acc, dev) if seq_agg else empty
    row_count = _empty((S,), acc, dev) if seq_agg else empty
    # a program's row: its merged record, then its warps' records (reduce_record's scratch)
    partial = _empty((programs, layout.partial_row(LOSS_WARPS)), acc, dev)
    loss = _empty((), acc, dev)
    metrics = _empty((layout.METRIC_WIDTH.value,), acc, dev)
    grad_scale = _empty((1,), acc, dev)
    cu = x.cu_seqlens if x.packed else empty

    streams = _streams(x)
    tokens = dict(**streams, cu_ptr=cu, N=N, T=geo["T"], S=S, chunk=geo["chunk"], n_chunks=n_chunks,
                  clamp=float(clamp), gamma_rule=fam.gamma_rule.as_tuple())
    flags = dict(ACC=_tl_dtype(x.log_prob.dtype), UNIT_STRIDE=_unit_token_stride(x, streams),
                 HAS_ADV=x.advantages is not None,
                 HAS_MASK=x.response_mask is not None, HAS_ROLLOUT=x.rollout is not None,
                 PACKED=x.packed, KS=KS, G=G)
    steps = []
    if fam.needs_stats:
        block, options = _tile(STATS_TILE_ESS_EXACT if fam.ess_exact else STATS_TILE, fp64)
        steps.append(Launch(batch_stats_kernel, (programs,),
                            dict(**tokens, rec_ptr=stats, scratch_ptr=partial, scratch_stride=partial.stride(0)),
                            dict(**flags, HAS_REF=False, SIGN_GROUPS=fam.sign_groups, ESS_EXACT=fam.ess_exact,
                                 ROW_STATS=row_stats, WARPS=_lane_warps(block, options), BLOCK_T=block),
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
        dict(**tokens, stats_ptr=records, n_stats=records.shape[0] if batch_stats else 0,
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
        dict(**flags, FAMILY=fam.family, OPT=fam.opt, GAMMA_MODE=fam.gamma_mode,
             KL_TYPE=kl_type,
             BATCH_STATS=batch_stats, ROW_STATS=row_stats, SIGN_GROUPS=fam.sign_groups,
             WRITE_GRAD=write_grad, SEQ_AGG=seq_agg,
             COUNTS_ON_DEVICE=(isinstance(agg.global_token_count, torch.Tensor)
                               + 2 * isinstance(agg.global_batch_size, torch.Tensor)),
             SEQ_GAMMA=fam.per_row and fam.family != VESPO.value,
             SLOTS=layout.partial_slots(fam.sign_groups, not batch_stats, kl_type != 0,
                                        fam.family <= IS_RESHAPE_VAR.value, seq_agg, fam.extra_terms),
             WARPS=LOSS_WARPS, BLOCK_REC=BLOCK_REC, BLOCK_T=block,
             BLOCK_P=max(_pow2(TILING.max_programs), 32 * LOSS_WARPS),  # a lane per thread at least
             BLOCK_E=BLOCK_ELEMENTS),
        options))
    return Plan(steps, loss, metrics, neg_phi, grad_scale, row_count, geo)


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


def _gather_rows(tensors, process_group) -> list:
    """Each [R, T] tensor's rows from every rank, padded to the largest R and T (False or
    0), concatenated in rank order (identical on every rank). One host sync: the shapes."""
    world = torch.distributed.get_world_size(process_group)
    shape = torch.tensor(tensors[0].shape, device=tensors[0].device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape, group=process_group)
    R, T = (int(v) for v in torch.stack(shapes).amax(0).tolist())
    gathered = []
    for t in tensors:
        padded = t.new_zeros((R, T))
        padded[: t.shape[0], : t.shape[1]] = t
        out = t.new_empty((world * R, T))
        torch.distributed.all_gather_into_tensor(out, padded, group=process_group)
        gathered.append(out)
    return gathered


def _psis_rows(x: Inputs, per_row: bool) -> Inputs:
    """[R, T] inputs for PSIS: padded as they are; packed as one row for a batch γ, or padded
    to [S, longest] for per-sequence γ (one sync: the longest length)."""
    if not x.packed:
        return x
    if per_row:
        longest = int((x.cu_seqlens[1:] - x.cu_seqlens[:-1]).max()) if x.rows else 0
        return pad_packed(x, longest)
    adv = None if x.advantages is None else _per_token_advantages(x)
    one_row = [None if t is None else t.reshape(1, -1)
               for t in (x.log_prob, x.old_log_prob, adv, x.response_mask)]
    return Inputs(*one_row, x.shape)


def _per_token_advantages(x: Inputs) -> torch.Tensor:
    """[N] advantages of a packed batch ([S] ones repeated over each sequence's tokens)."""
    adv = x.advantages
    n = x.log_prob.shape[0]
    if adv.shape[0] == n:
        return adv
    pos = torch.arange(n, device=adv.device)
    row = torch.searchsorted(x.cu_seqlens.to(torch.int64), pos, right=True) - 1
    return adv[row.clamp(0, adv.shape[0] - 1)]


def _psis_context(x: Inputs, loss_type: str, params, fam: KernelFamily, clamp: float,
                  process_group=None):
    """(c0, c1) per batch ([2]) or per row ([R, 2]) from Pareto-smoothed IS, and the
    psis_k / psis_unreliable metrics: torch ops on the device (sorting and the
    generalized-Pareto fit are not kernel work), no host sync on one process. A group
    whose γ is fixed is not fitted (k̂ = 0). With ``process_group`` and one γ per batch,
    the fit runs on the gathered ℓ of all ranks (PSIS needs the tail of the global
    sample), so every rank computes the same γ; this costs one sync (the ranks' shapes).
    """
    per_row = fam.per_row
    x = _psis_rows(x, per_row)
    acc = _acc_dtype(x.log_prob.dtype)
    counted = (torch.ones_like(x.log_prob, dtype=torch.bool) if x.response_mask is None
               else x.response_mask != 0)
    diff = x.log_prob.detach().to(acc) - x.old_log_prob.to(acc)
    bound = diff.new_ones(()) * clamp  # a tensor: a symbolic clamp stays symbolic under torch.compile
    ell = torch.where(counted, torch.where(torch.isfinite(diff), diff, math.nan), 0.0)
    ell = torch.minimum(torch.maximum(ell, -bound), bound)
    dims = (1,) if per_row else (0, 1)
    sign = loss_type == "is_reshape_sign"
    if sign:
        adv = x.advantages.to(acc) if x.advantages is not None else torch.ones_like(ell)
        groups = [counted & (adv > 0), counted & (adv < 0)]
    else:
        groups = [counted]
    if process_group is not None and not per_row:
        ell, *groups = _gather_rows([ell, *groups], process_group)
    lo_hi = (fam.gamma_rule.range_a, fam.gamma_rule.range_b)
    finite = torch.where(ell.isnan(), 0.0, ell)

    def fit(grp, lo, hi):  # a group holding a non-finite ℓ: NaN γ and k̂ (SPEC §11)
        g, k = psis_gamma(finite, grp, rho_min=params.rho_min, lo=lo, hi=hi, fallback=params.gamma_fallback,
                          per_row=per_row)
        tainted = (grp & ell.isnan()).any(dim=dims)
        return torch.where(tainted, math.nan, g), torch.where(tainted, math.nan, k)

    fits = [fit(grp, lo, hi) for grp, (lo, hi) in zip(groups, lo_hi)]
    if sign:
        (g_pos, k_pos), (d_neg, k_neg) = fits
        c0 = torch.where(groups[0].sum(dims) > 0, g_pos.to(acc), 0.5)
        c1 = torch.where(groups[1].sum(dims) > 0, 1.0 + d_neg.to(acc), 1.5)
        if params.gamma_pos is not None:
            c0, k_pos = torch.full_like(c0, params.gamma_pos), torch.zeros_like(k_pos)
        if params.gamma_neg is not None:
            c1, k_neg = torch.full_like(c1, params.gamma_neg), torch.zeros_like(k_neg)
        k_hat = torch.maximum(k_pos, k_neg)
    else:
        (g, k_hat), = fits
        c0 = g.to(acc)
        c1 = torch.zeros_like(c0)
    k_hat = k_hat.to(acc)
    extra = {"psis_k": k_hat.amax() if k_hat.numel() else k_hat.new_zeros(()),
             "psis_unreliable": torch.where(k_hat.isnan().any(), math.nan, (k_hat > K_HAT_THRESHOLD).any().to(acc))}
    return torch.stack([c0, c1], dim=-1).contiguous(), extra


# ----------------------------------------------------------------------------- custom op
# The fused op as two PyTorch custom ops (torch.library), so that torch.compile (no graph
# break), torch.func and CUDA graphs see one opaque op with a fake implementation (output
# shapes from input shapes alone) and an autograd formula:
#   isreshape_triton::policy_loss           forward: 1-2 launches (+ the all-gather)
#   isreshape_triton::policy_loss_backward  the one backward launch
# The configuration crosses the op boundary as (loss_agg_mode, ints, floats, group name),
# see ``encode_config``. A new tensor input is a new Optional[Tensor] argument of
# ``_policy_loss_forward`` (before loss_agg_mode) and of its fake; ``_run_fused`` passes it.

_CONFIG_INTS = ("family", "opt", "gamma_mode", "needs_stats", "per_row", "sign_groups", "dp_size",
                "write_grad", "kl_type", "extra_terms")
_CONFIG_FLOATS = ("clamp", "rho_min", "fixed_a", "fixed_b", "range_a_lo", "range_a_hi", "range_b_lo",
                  "range_b_hi", "global_token_count", "global_batch_size", "loss_scale_factor",
                  "kl_coef")  # + params
_KL_NAMES = {code: name for name, code in reversed(KL_TYPES.items())}  # a code's first name


def encode_config(fam: KernelFamily, agg: AggConfig, kl: KLConfig, clamp: float, write_grad: bool) -> tuple:
    """(loss_agg_mode, ints, floats): the op's configuration as custom-op arguments, ints
    and floats in the order of ``_CONFIG_INTS`` and ``_CONFIG_FLOATS`` + the family's
    runtime floats. A count given as a tensor is an op input; it and a missing number are −1.
    A float may be a ``torch.SymFloat`` (see :func:`split_symbolic`)."""
    ints = [fam.family, fam.opt, fam.gamma_mode, int(fam.needs_stats), int(fam.per_row),
            int(fam.sign_groups), agg.dp_size, int(write_grad), kl.code, fam.extra_terms]
    counts = [-1.0 if v is None or isinstance(v, torch.Tensor) else as_number(v)
              for v in (agg.global_token_count, agg.global_batch_size, agg.loss_scale_factor)]
    floats = [as_number(clamp), *fam.gamma_rule.as_tuple(), *counts, as_number(kl.kl_coef), *fam.params]
    return agg.loss_agg_mode, ints, floats


def split_symbolic(floats: list) -> tuple:
    """(floats, symbolic values, their indices): under torch.compile a float that Dynamo
    traces as a graph input is a ``torch.SymFloat``, which a custom op's ``float`` argument
    would specialize (one graph per value). Those values travel instead as a float64 CPU
    tensor computed in the graph (1·v), read back on the host inside the op (no device
    sync); their places in ``floats`` hold 0. Eager calls have none: (floats, None, [])."""
    index = [i for i, v in enumerate(floats) if isinstance(v, torch.SymFloat)]
    if not index:
        return floats, None, []
    one = torch.ones((), dtype=torch.float64)
    values = torch.stack([one * floats[i] for i in index])
    return [0.0 if i in index else v for i, v in enumerate(floats)], values, index


def decode_config(loss_agg_mode: str, ints, floats, global_token_count=None, global_batch_size=None):
    """(KernelFamily, AggConfig, KLConfig, clamp, write_grad) back from :func:`encode_config`."""
    i = dict(zip(_CONFIG_INTS, ints, strict=True))
    f = dict(zip(_CONFIG_FLOATS, floats))
    fam = KernelFamily(i["family"], tuple(floats[len(_CONFIG_FLOATS):]), i["opt"], i["gamma_mode"],
                       GammaRule(f["rho_min"], f["fixed_a"], f["fixed_b"], (f["range_a_lo"], f["range_a_hi"]),
                                 (f["range_b_lo"], f["range_b_hi"])),
                       bool(i["needs_stats"]), bool(i["per_row"]), bool(i["sign_groups"]), i["extra_terms"])
    gtc, gbs, lsf = (None if f[k] < 0 else f[k] for k in ("global_token_count", "global_batch_size",
                                                          "loss_scale_factor"))
    agg = AggConfig(loss_agg_mode, i["dp_size"], global_token_count if global_token_count is not None else gtc,
                    global_batch_size if global_batch_size is not None else gbs, lsf)
    return fam, agg, KLConfig(f["kl_coef"], _KL_NAMES[i["kl_type"]]), f["clamp"], bool(i["write_grad"])


def _policy_loss_forward(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: Optional[torch.Tensor],
                         response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                         gamma: Optional[torch.Tensor], global_token_count: Optional[torch.Tensor],
                         global_batch_size: Optional[torch.Tensor], rollout: Optional[torch.Tensor],
                         ref_log_prob: Optional[torch.Tensor], symbolic_floats: Optional[torch.Tensor],
                         loss_agg_mode: str, ints: list[int], floats: list[float], symbolic_index: list[int],
                         group: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, metric vector, −m·φ, grad_scale, row_count) of the prepared inputs ([R, T], or
    [N] packed; see :func:`encode_config` for the rest): the launches of :func:`plan_launches`.
    ``symbolic_floats`` go to the places ``symbolic_index`` of ``floats`` (:func:`split_symbolic`).
    ``group``: the process group's name ("" for none)."""
    if symbolic_floats is not None:
        floats = list(floats)
        for i, v in zip(symbolic_index, symbolic_floats.tolist(), strict=True):
            floats[i] = v
    fam, agg, kl, clamp, write_grad = decode_config(loss_agg_mode, ints, floats, global_token_count,
                                                    global_batch_size)
    x = Inputs(log_prob, old_log_prob, advantages, response_mask, log_prob.shape, cu_seqlens, rollout,
               ref_log_prob)
    process_group = torch.distributed.distributed_c10d._resolve_process_group(group) if group else None
    plan = plan_launches(x, fam, agg, clamp, write_grad, gamma, process_group, kl)
    for step in plan.steps:
        step()
    neg_phi = plan.neg_phi if write_grad else _empty((0,), plan.loss.dtype, log_prob.device)
    return plan.loss, plan.metrics, neg_phi, plan.grad_scale, plan.row_count


_OP_ARGS = tuple(inspect.signature(_policy_loss_forward).parameters)
_policy_loss_op = torch.library.custom_op("isreshape_triton::policy_loss", _policy_loss_forward,
                                          mutates_args=())


@_policy_loss_op.register_fake
def _(*args):
    """Output shapes and dtypes from the input shapes alone (no data-dependent size)."""
    a = dict(zip(_OP_ARGS, args))
    lp, cu, mode = a["log_prob"], a["cu_seqlens"], a["loss_agg_mode"]
    write_grad = decode_config(mode, a["ints"], a["floats"], a["global_token_count"], a["global_batch_size"])[4]
    rows = cu.shape[0] - 1 if cu is not None else lp.shape[0]
    shapes = [(), (layout.METRIC_WIDTH.value,), (lp.numel() if write_grad else 0,), (1,),
              (rows if mode in _SEQ_AGG else 0,)]
    return tuple(lp.new_empty(shape, dtype=_acc_dtype(lp.dtype)) for shape in shapes)


def _policy_loss_backward(neg_phi: torch.Tensor, grad_scale: torch.Tensor, grad_loss: torch.Tensor,
                          row_count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], shape: list[int],
                          dtype: torch.dtype, per_row: bool) -> torch.Tensor:
    """∂loss/∂log_prob (``shape``, ``dtype``) = −m·φ · s · grad_loss: one launch."""
    grad = _empty(shape, dtype, neg_phi.device)
    x = Inputs(neg_phi.view(shape), None, None, None, grad.shape, cu_seqlens)
    backward_launch(neg_phi, grad, grad_scale, grad_loss.to(grad_scale.dtype), row_count, cu_seqlens,
                    geometry(x), per_row)()
    return grad


_policy_loss_backward_op = torch.library.custom_op("isreshape_triton::policy_loss_backward",
                                                   _policy_loss_backward, mutates_args=())


@_policy_loss_backward_op.register_fake
def _(neg_phi, grad_scale, grad_loss, row_count, cu_seqlens, shape, dtype, per_row):
    return neg_phi.new_empty(shape, dtype=dtype)


DOUBLE_BACKWARD_ERROR = (
    "isreshape_triton.policy_loss does not support double backward: its gradient "
    "∂loss/∂log_prob = −s·m·φ is the policy-gradient weight, and no trainer differentiates it "
    "(use grad.detach() to treat the gradient as data)")


class _NoDoubleBackward(torch.autograd.Function):
    """The gradient, unchanged, tied to log_prob in the graph that ``create_graph=True``
    builds: differentiating it (a gradient penalty, a Hessian-vector product) raises
    :data:`DOUBLE_BACKWARD_ERROR` instead of silently treating it as a constant."""

    @staticmethod
    def forward(grad, log_prob):
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_grad):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _setup_context(ctx, inputs, output):
    a = dict(zip(_OP_ARGS, inputs))
    _loss, metrics, neg_phi, grad_scale, row_count = output
    ctx.mark_non_differentiable(metrics, neg_phi, grad_scale, row_count)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.save_for_backward(neg_phi, grad_scale, row_count, a["cu_seqlens"], a["log_prob"])
    ctx.per_row = a["loss_agg_mode"] == "seq-mean-token-mean"


def _backward(ctx, grad_loss, *_unused):
    """Only log_prob gets a gradient (old_log_prob, advantages, the mask, γ are constants)."""
    neg_phi, grad_scale, row_count, cu_seqlens, log_prob = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = _policy_loss_backward_op(neg_phi, grad_scale, grad_loss, row_count, cu_seqlens,
                                        list(log_prob.shape), log_prob.dtype, ctx.per_row)
        if torch.is_grad_enabled():  # create_graph=True: refuse to differentiate the gradient
            grad = _NoDoubleBackward.apply(grad, log_prob)
    return (grad,) + (None,) * (len(_OP_ARGS) - 1)


_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedPolicyLoss(torch.autograd.Function):
    """The custom op with its autograd formula, as the package calls it: the wrapper that
    ``register_autograd`` generates has no ``setup_context`` staticmethod in torch 2.13,
    and torch.func refuses such a Function (pytorch/pytorch#170834)."""

    @staticmethod
    def forward(*args):
        return _policy_loss_op(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def _run_fused(x: Inputs, mask, gamma, fam: KernelFamily, agg: AggConfig, kl: KLConfig, clamp: float,
               write_grad: bool, process_group=None) -> tuple:
    """(loss, metric vector) from the custom op; old_log_prob, advantages, the mask, the
    rollout weights and ref_log_prob enter detached, so the loss requires grad exactly when
    log_prob does."""
    mode, ints, floats = encode_config(fam, agg, kl, clamp, write_grad)
    floats, symbolic, index = split_symbolic(floats)
    counts = [v if isinstance(v, torch.Tensor) else None for v in (agg.global_token_count, agg.global_batch_size)]
    detached = [None if t is None else t.detach() for t in (x.old_log_prob, x.advantages, mask)]
    optional = [None if t is None else t.detach() for t in (x.rollout, x.ref_log_prob)]
    group = process_group.group_name if process_group is not None else ""
    loss, metrics, *_saved = _FusedPolicyLoss.apply(x.log_prob, *detached, x.cu_seqlens, gamma, *counts, *optional,
                                                    symbolic, mode, ints, floats, index, group)
    return loss, metrics


def fused_policy_loss(log_prob, old_log_prob, advantages=None, response_mask=None,
                      loss_type="is_reshape", loss_agg_mode="token-mean", *, dp_size=1,
                      global_token_count=None, global_batch_size=None, loss_scale_factor=None,
                      log_ratio_clamp=20.0, cu_seqlens=None, validate=False, rollout_is_weights=None,
                      ref_log_prob=None, kl_coef=None, kl_type="low_var_kl", process_group=None,
                      params=None, **family_params):
    """``irt.policy_loss`` on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    With ``process_group`` every rank merges the statistics records of all ranks, so γ
    is that of the concatenated global batch and bit-identical on every rank.
    """
    check_process_group(process_group)
    log_ratio_clamp = check_log_ratio_clamp(log_ratio_clamp)
    params = make_params(loss_type, params, **family_params)
    agg = AggConfig(loss_agg_mode, dp_size, global_token_count, global_batch_size, loss_scale_factor)
    kl = kl_config(kl_coef, kl_type, ref_log_prob)
    x = prepare_inputs(log_prob, old_log_prob, advantages, response_mask, log_ratio_clamp,
                       cu_seqlens, validate, rollout_is_weights, ref_log_prob)
    agg.check_device(x.log_prob.device)
    mask = x.response_mask
    if mask is not None and mask.dtype.is_floating_point and mask.element_size() == 1:
        mask = mask != 0  # fp8: Triton cannot compare it with 0 on every target
    fam = kernel_family(loss_type, params)
    gamma, extra = (None, {})
    if fam.psis:
        gamma, extra = _psis_context(x, loss_type, params, fam, as_number(log_ratio_clamp), process_group)
    write_grad = torch.is_grad_enabled() and x.log_prob.requires_grad
    loss, metric_vec = _run_fused(x, mask, gamma, fam, agg, kl, as_number(log_ratio_clamp), write_grad,
                                  process_group)
    metrics = {name: extra[name] if name in extra else metric_vec[_METRIC_INDEX[name]]
               for name in metric_names(loss_type, params, kl=x.ref_log_prob is not None)}
    return loss, metrics


def traffic_model(loss_type: str, dtype: torch.dtype, mask_dtype: Optional[torch.dtype], B: int, T: int,
                  adv_shape: str = "BT", params=None, backward: bool = True, split: bool = False):
    """Tensor bytes the fused op moves for a [B, T] batch (forward + backward), counting
    every tensor once per kernel that reads or writes it.

    Per token: the loss pass reads every input once and the statistics pass (families with
    statistics) reads them again, advantages only where it needs them (the sign family's
    groups); the loss pass writes −m·φ in fp32 (fp64 for fp64); the backward reads it and
    writes the gradient in log_prob's dtype. Plus the O(B + chunks + programs) record,
    element and partial buffers. adv_shape: "BT", "B" or "none". ``split=True`` returns
    (per-token streams, buffers) instead of their sum.
    """
    params = make_params(loss_type, params)
    fam = kernel_family(loss_type, params)
    item = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=_acc_dtype(dtype)).element_size()
    n = B * T
    adv_bytes = {"BT": item * n, "B": item * B, "none": 0}[adv_shape]
    mask_bytes = 0 if mask_dtype is None else torch.empty((), dtype=mask_dtype).element_size() * n
    streams = 2 * item * n + adv_bytes + mask_bytes  # loss pass
    chunk = TILING.chunk(n)
    n_chunks = -(-n // chunk)
    programs = max(1, min(n_chunks, TILING.max_programs))
    if fam.needs_stats:
        streams += 2 * item * n + (adv_bytes if fam.sign_groups else 0) + mask_bytes
    if backward:
        streams += acc * n + acc * n + item * n
    # statistics records (written once, read by every program or by each piece of the row),
    # partials (written, read), seq elements (written, read), row counts, outputs
    records = 0
    if fam.needs_stats:
        ks = layout.S_BASE_WIDTH + (8 * ESS_GRID_POINTS if fam.ess_exact else 0)
        # row rules: one record per piece = rows + chunk boundaries that cut a row
        cuts = max(n_chunks - 1, 0) - (max(n - 1, 0) // math.lcm(chunk, T) if T else 0)
        records = 2 * ((B + cuts) if fam.per_row else programs) * ks
    # a program's partial row: its record and its warps' (written and read once each)
    buffers = acc * (records + 2 * programs * layout.partial_row(LOSS_WARPS)
                     + 2 * 2 * n_chunks * layout.ELEMENT_WIDTH.value + 2 * B + 2 + layout.METRIC_WIDTH.value)
    return (streams, buffers) if split else streams + buffers
