"""``policy_loss_from_logits`` (SPEC §8): the loss of any family straight from the logits.

The op is a chain of two autograd Functions:

1. ``_SelectiveLogSoftmax``: one pass over the vocabulary per token
   (``kernels/logits.py``) writes log_prob, lse and the entropy, O(N) bytes; its
   backward re-reads the logits once and writes grad_logits
   = [g·(onehot − p) − g_H·p·(z − Σp·z)]/temperature in the logits' dtype (into the
   logits' storage with ``inplace_backward=True``, bumping their autograd version).
2. ``irt.policy_loss`` on that log_prob: the log-prob op's own passes (statistics,
   loss) and backward, reused as they are. Its gradient w.r.t. log_prob is the g fed
   to step 1's backward.

Batch invariance: a token's log_prob, lse, entropy and gradient row are the same bits
whatever the batch (its size, padded [B, T, V] or packed [N, V]). The reduction order
over V is a function of V alone (``vocab_chunks``: chunks of ≥ MIN_CHUNK_TILES tiles,
their records merged in chunk order); N only decides the launch
(``chunks_per_program``): when the tokens are too few to fill the GPU (N < 2·132), each
token's chunks are spread over several programs and the last of them (an integer
ticket; the tickets start from a memset of 4·N bytes) merges the records, otherwise
one program per token reduces all its chunks and merges them itself, with the same
merge. No second launch, no host sync.

Launches: forward = the log-prob op's forward + 1 Triton launch (+ one all-gather and
one merge launch with ``tp_group``); backward = the log-prob op's backward + 1.

Traffic: the logits are read twice (forward, backward) and grad_logits written once;
everything else is O(N): with more than one chunk, 16 B of record per token and chunk,
written and read back (at V = 152K: 15 chunks, 240 B per token against 304 KB of bf16
logits). No [N, V] temporary.

Vocabulary parallel (``tp_group``): rank r holds columns [r·V/tp, (r+1)·V/tp). Each
rank writes its per-token records (max M, S = Σe^{z−M}, Q = Σe^{z−M}(z−M), target
logit t or 0), ONE ``all_gather_into_tensor`` collects the [tp, N, n_chunks, 4]
records of all ranks, and every rank merges them in the same fixed (rank, chunk)
order, so log_prob, lse and entropy are bit-identical on every rank. An all-reduce
cannot do it in one collective (the sums must be rescaled to the global max first:
max, then sum = two collectives); the gather moves tp × 16 B per token record, still
O(N). Each rank's backward writes the gradient of its own shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import api
from .params import check_loss_agg_mode, check_loss_type
from .reference.from_logits import check_logits_inputs, check_token_shapes
from .reference.from_logits import policy_loss_from_logits as reference_policy_loss_from_logits
from .reference.from_logits import selective_log_softmax as reference_selective_log_softmax

BLOCK_V = 2048  # vocabulary tile (columns per loop iteration)
BLOCK_R = 64  # records per merge iteration
TARGET_ITEMS = 2 * 132  # programs that fill an H100 twice
MIN_CHUNK_TILES = 4  # a chunk spans at least 4 tiles (8192 columns) when V has them
FORWARD_OPTIONS = {"num_warps": 4, "num_stages": 1}
BACKWARD_OPTIONS = {"num_warps": 4, "num_stages": 1}
MERGE_OPTIONS = {"num_warps": 2, "num_stages": 1}
REC_WIDTH = 4  # kernels.logits.REC_WIDTH: (M, S, Q, t)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)  # labels the kernels take as int64


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write (tests replace this with a NaN-poisoned fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def vocab_chunks(V: int) -> tuple:
    """(n_chunks, chunk_tiles): the reduction order over V, a function of V alone: V is
    cut into n_chunks = max(1, ⌊tiles / MIN_CHUNK_TILES⌋) balanced chunks of
    ``chunk_tiles`` tiles of BLOCK_V columns, merged in chunk order."""
    tiles = -(-V // BLOCK_V)
    chunk_tiles = -(-tiles // max(1, tiles // MIN_CHUNK_TILES))
    return -(-tiles // chunk_tiles), chunk_tiles


def chunks_per_program(N: int, n_chunks: int) -> int:
    """The launch: each program reduces this many consecutive chunks of one token, all
    of them once N tokens alone give TARGET_ITEMS programs, else few enough that the
    N·⌈n_chunks / per_program⌉ programs reach TARGET_ITEMS where V allows (balanced)."""
    programs = -(-n_chunks // max(1, n_chunks // -(-TARGET_ITEMS // max(N, 1))))  # per token
    return -(-n_chunks // programs)


def _alignment(V: int, *tensors) -> int:
    """ALIGN: the largest power of two, at most 16 bytes of elements, that divides V and
    every token stride of ``tensors``, so that a row starts on an ALIGN-element boundary
    of an aligned base and the tile loads vectorize."""
    align = 16 // tensors[0].element_size()
    values = [V] + [s for t in tensors for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1]
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def _token_strides(t: torch.Tensor, lead_dims: int) -> tuple:
    """(T_in, s_outer, s_inner) addressing token n of t's leading [B, T] or [N] dims."""
    if lead_dims == 2:
        return max(t.shape[1], 1), t.stride(0), t.stride(1)
    return max(t.shape[0], 1), 0, t.stride(0)


@dataclass(frozen=True)
class _Config:
    temperature: float
    entropy: bool
    inplace: bool
    tp_group: object = None


def _vocab_layout(V: int, tp_group) -> tuple:
    """(rank, world, first column of this shard, global V)."""
    if tp_group is None:
        return 0, 1, 0, V
    world = torch.distributed.get_world_size(tp_group)
    rank = torch.distributed.get_rank(tp_group)
    return rank, world, rank * V, world * V


def plan_forward(logits: torch.Tensor, labels: torch.Tensor, cfg: _Config) -> tuple:
    """(steps, log_prob, lse, entropy): the launches (and the all-gather with a tp group)
    of the forward pass; nothing runs."""
    from .kernels import logits as kl  # triton loads on first use (TRITON_INTERPRET is read then)
    from .launch import Launch

    lead = logits.dim() - 1
    N, V = labels.numel(), logits.shape[-1]
    dev = logits.device
    log_prob = _empty((N,), torch.float32, dev)
    lse = _empty((N,), torch.float32, dev)
    entropy = _empty((N,), torch.float32, dev) if cfg.entropy else lse
    if N == 0:
        return [], log_prob, lse, entropy
    _, world, vocab_lo, V_total = _vocab_layout(V, cfg.tp_group)
    n_chunks, chunk_tiles = vocab_chunks(V)
    per_program = chunks_per_program(N, n_chunks)
    mode = (kl.RECORDS if world > 1 else kl.DIRECT if n_chunks == 1 else
            kl.WALK if per_program == n_chunks else kl.TICKET).value
    records = _empty((N, n_chunks, REC_WIDTH), torch.float32, dev) if mode != kl.DIRECT.value else lse
    tickets = torch.zeros((N,), dtype=torch.int32, device=dev) if mode == kl.TICKET.value else lse
    T_in, s_outer, s_inner = _token_strides(logits, lead)
    _, s_lab_outer, s_lab_inner = _token_strides(labels, lead)
    steps = [Launch(kl.logits_forward_kernel, (N * -(-n_chunks // per_program),),
                    dict(logits_ptr=logits, labels_ptr=labels, rec_ptr=records, ticket_ptr=tickets,
                         lp_ptr=log_prob, lse_ptr=lse, ent_ptr=entropy, N=N, V=V, T_in=T_in,
                         s_outer=s_outer, s_inner=s_inner, s_lab_outer=s_lab_outer, s_lab_inner=s_lab_inner,
                         n_chunks=n_chunks, chunk_tiles=chunk_tiles, per_program=per_program,
                         vocab_lo=vocab_lo, V_total=V_total, inv_temp=1.0 / cfg.temperature),
                    dict(MODE=mode, ENTROPY=cfg.entropy, ALIGN=_alignment(V, logits), BLOCK_V=BLOCK_V,
                         BLOCK_R=BLOCK_R),
                    FORWARD_OPTIONS)]
    if mode == kl.RECORDS.value:
        gathered = _empty((world * N, n_chunks, REC_WIDTH), torch.float32, dev)  # [world, N] flattened
        steps.append(lambda: torch.distributed.all_gather_into_tensor(gathered, records, group=cfg.tp_group))
        steps.append(Launch(kl.merge_vocab_records_kernel, (N,),
                            dict(rec_ptr=gathered, labels_ptr=labels, lp_ptr=log_prob, lse_ptr=lse,
                                 ent_ptr=entropy, N=N, T_in=T_in, s_lab_outer=s_lab_outer,
                                 s_lab_inner=s_lab_inner, n_ranks=world, n_chunks=n_chunks, V_total=V_total),
                            dict(ENTROPY=cfg.entropy, BLOCK_R=BLOCK_R), MERGE_OPTIONS))
    return steps, log_prob, lse, entropy


def plan_backward(logits, labels, log_prob, lse, entropy, grad_log_prob, grad_entropy, cfg: _Config) -> tuple:
    """(launch, grad_logits) of the backward pass; grad_logits is the logits' own storage
    with ``cfg.inplace``."""
    from .kernels import logits as kl
    from .launch import Launch

    lead = logits.dim() - 1
    N, V = labels.numel(), logits.shape[-1]
    grad = logits.detach() if cfg.inplace else _empty(logits.shape, logits.dtype, logits.device)
    if N == 0:
        return None, grad
    n_chunks, chunk_tiles = vocab_chunks(V)
    per_program = chunks_per_program(N, n_chunks)
    _, _, vocab_lo, _ = _vocab_layout(V, cfg.tp_group)
    T_in, s_outer, s_inner = _token_strides(logits, lead)
    _, g_outer, g_inner = _token_strides(grad, lead)
    _, s_lab_outer, s_lab_inner = _token_strides(labels, lead)
    glp = grad_log_prob.reshape(N) if grad_log_prob is not None else lse
    gent = grad_entropy.reshape(N) if grad_entropy is not None else lse
    launch = Launch(kl.logits_backward_kernel, (N * -(-n_chunks // per_program),),
                    dict(logits_ptr=logits, grad_ptr=grad, labels_ptr=labels, lp_ptr=log_prob, lse_ptr=lse,
                         ent_ptr=entropy,
                         glp_ptr=glp, gent_ptr=gent, N=N, V=V, T_in=T_in, s_outer=s_outer,
                         s_inner=s_inner, g_outer=g_outer, g_inner=g_inner, s_lab_outer=s_lab_outer,
                         s_lab_inner=s_lab_inner, s_glp=glp.stride(0), s_gent=gent.stride(0),
                         n_chunks=n_chunks, chunk_tiles=chunk_tiles, per_program=per_program,
                         vocab_lo=vocab_lo, inv_temp=1.0 / cfg.temperature),
                    dict(LP_GRAD=grad_log_prob is not None, ENT_GRAD=grad_entropy is not None,
                         ALIGN=_alignment(V, logits, grad), BLOCK_V=BLOCK_V),
                    BACKWARD_OPTIONS)
    return launch, grad


class _SelectiveLogSoftmax(torch.autograd.Function):
    """logits, labels → log_prob (and the entropy with ``cfg.entropy``), both [N] fp32."""

    @staticmethod
    def forward(ctx, logits, labels, cfg):
        steps, log_prob, lse, entropy = plan_forward(logits, labels, cfg)
        for step in steps:
            step()
        shape = labels.shape
        ctx.cfg = cfg
        ctx.save_for_backward(logits, labels, log_prob, lse, entropy)
        ctx.set_materialize_grads(False)
        if cfg.entropy:
            return log_prob.view(shape), entropy.view(shape)
        return log_prob.view(shape)

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy=None):
        if grad_log_prob is None and grad_entropy is None:
            return None, None, None
        logits, labels, log_prob, lse, entropy = ctx.saved_tensors
        launch, grad = plan_backward(logits, labels, log_prob, lse, entropy, grad_log_prob, grad_entropy, ctx.cfg)
        if launch is not None:
            launch()
        if ctx.cfg.inplace:  # the kernel wrote the logits through a raw pointer: tell autograd
            torch.autograd.graph.increment_version(grad)
        return grad, None, None


def selective_log_softmax(logits, labels, temperature=1.0, *, return_entropy=True,
                          inplace_backward=False, tp_group=None):
    """log_prob = log_softmax(logits/temperature)[labels] (NaN where a label is outside
    [0, V)), and with ``return_entropy`` the differentiable entropy; fp32, shape
    ``labels.shape``. CUDA (or TRITON_INTERPRET=1) runs the kernels, other CPU tensors
    the reference. Logits whose vocabulary dimension is not unit-stride are copied once.
    ``inplace_backward``: as in ``policy_loss_from_logits``."""
    on_kernels = isinstance(logits, torch.Tensor) and api.uses_kernels(logits)
    check_logits_inputs(logits, labels, None, temperature, return_entropy, inplace_backward, kernel=on_kernels,
                        tp_group=tp_group)
    if not on_kernels:
        log_prob, entropy = reference_selective_log_softmax(logits, labels, temperature,
                                                             inplace_backward=inplace_backward)
        return log_prob, entropy if return_entropy else None
    if labels.dtype in _WIDE_UNSIGNED:  # read as int64 (values ≥ 2^63 wrap negative: NaN), as on the
        labels = labels.to(torch.int64)  # reference; one O(N) copy, no kernel specialization per dtype
    if logits.stride(-1) != 1:  # the kernels read unit-stride vocabulary rows (never in place: checked)
        logits = logits.contiguous()
    cfg = _Config(float(temperature), return_entropy, inplace_backward, tp_group)
    out = _SelectiveLogSoftmax.apply(logits, labels, cfg)
    return out if return_entropy else (out, None)


def policy_loss_from_logits(logits, labels, old_log_prob, advantages=None, response_mask=None,
                            loss_type="is_reshape", loss_agg_mode="token-mean", temperature=1.0,
                            return_entropy=False, inplace_backward=False, tp_group=None,
                            cu_seqlens=None, **family_params):
    """Loss and metrics of ``loss_type`` from logits [B, T, V] or packed [N, V] (SPEC §8).

    log_prob_t = log_softmax(logits/temperature)[labels_t] in fp32, then
    ``irt.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_type,
    loss_agg_mode, **family_params)`` (every family, option and aggregation argument of
    the log-prob op; ``cu_seqlens`` is passed on when given). Labels at masked positions
    may hold anything. Returns ``(loss, metrics)``, or ``(loss, metrics, entropy)`` with
    ``return_entropy=True``: the per-token fp32 entropy of softmax(logits/temperature),
    differentiable (an entropy bonus in the loss gets its gradient in the same backward
    pass). ``tp_group``: vocabulary-parallel logits (module doc).

    ``inplace_backward=True`` writes grad_logits into the logits' storage (the logits are
    overwritten) and bumps their autograd version, on both paths: a backward that reads
    these logits after this op's backward (an op that saved them before this call, e.g. a
    z-loss on logsumexp(logits) or a first call on the same logits; an op that saved its
    output as the logits, e.g. a final tanh) raises autograd's in-place error instead of
    getting a wrong gradient. Ops on the logits after this call are backpropagated first.

    ``temperature`` is the softmax temperature; is_reshape_var's own ``temperature``
    goes in ``params=IsReshapeVarParams(temperature=...)``.
    """
    if cu_seqlens is not None:
        family_params["cu_seqlens"] = cu_seqlens
    if not (isinstance(logits, torch.Tensor) and api.uses_kernels(logits)):
        return reference_policy_loss_from_logits(
            logits, labels, old_log_prob, advantages, response_mask, loss_type, loss_agg_mode,
            temperature, return_entropy, inplace_backward, tp_group, **family_params)
    check_logits_inputs(logits, labels, old_log_prob, temperature, return_entropy, inplace_backward,
                        tp_group=tp_group, cu_seqlens=cu_seqlens)  # fail fast, before any launch
    check_token_shapes(labels, advantages, response_mask, family_params)
    check_loss_type(loss_type)  # before the logits pass
    check_loss_agg_mode(loss_agg_mode)
    log_prob, entropy = selective_log_softmax(logits, labels, temperature, return_entropy=return_entropy,
                                              inplace_backward=inplace_backward, tp_group=tp_group)
    loss, metrics = api.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss_type,
                                    loss_agg_mode, **family_params)
    return (loss, metrics, entropy) if return_entropy else (loss, metrics)


def traffic_model(N: int, V: int, dtype: torch.dtype, entropy_grad: bool = False, backward: bool = True,
                  tp: int = 1, label_bytes: int = 8) -> int:
    """Bytes the from-logits kernels move for N tokens of V (local) columns; the log-prob
    op's own traffic (``launch.traffic_model`` on fp32 log_prob) comes on top.

    forward: the logits once, labels, the target logit again, log_prob / lse / entropy
    written; more than one chunk or sharded V: the records written and read back (tp ×
    with the all-gather), and the tickets (memset, atomic) when a token's chunks span
    several programs. backward: the logits once, grad_logits written once, labels, log_prob,
    lse, g (with an entropy gradient also H and g_H)."""
    item = torch.empty((), dtype=dtype).element_size()
    n_chunks, _ = vocab_chunks(V)
    total = N * V * item + N * (label_bytes + item + 3 * 4)
    if n_chunks > 1 or tp > 1:
        total += N * n_chunks * REC_WIDTH * 4 * (1 + tp)
    if tp > 1:
        total += N * label_bytes  # the merge's labels
    elif chunks_per_program(N, n_chunks) < n_chunks:
        total += 2 * N * 4  # tickets
    if backward:
        total += 2 * N * V * item + N * (label_bytes + 4 + 4 + 4 + (8 if entropy_grad else 0))
    return total
