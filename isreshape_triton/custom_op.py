"""The fused op as two PyTorch custom ops (torch.library), so that torch.compile (no graph
break), torch.func and CUDA graphs see one opaque op with a fake implementation (output
shapes from input shapes alone) and an autograd formula:

  isreshape_triton::policy_loss           forward: 1-2 launches (+ the all-gather)
  isreshape_triton::policy_loss_backward  the one backward launch

The configuration crosses the op boundary as (loss_agg_mode, ints, floats, group name), see
``encode_config``. A new tensor input is a new Optional[Tensor] argument of
``_policy_loss_forward`` (before loss_agg_mode) and of its fake; ``run_fused`` passes it.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import launch
from .families import FAMILIES, bind
from .family import GAMMA_MODES, GammaRule, KernelFamily
from .inputs import Inputs
from .kernels import layout
from .launch import SEQ_AGG_MODES, acc_dtype, backward_launch, geometry, plan_launches
from .options import as_number
from .params import NO_CORRECTION, AggConfig, KLConfig

# The fused op as two PyTorch custom ops (torch.library), so that torch.compile (no graph
# break), torch.func and CUDA graphs see one opaque op with a fake implementation (output
# shapes from input shapes alone) and an autograd formula:
#   isreshape_triton::policy_loss           forward: 1-2 launches (+ the all-gather)
#   isreshape_triton::policy_loss_backward  the one backward launch
# The configuration crosses the op boundary as (loss_agg_mode, ints, floats, group name),
# see ``encode_config``. A new tensor input is a new Optional[Tensor] argument of
# ``_policy_loss_forward`` (before loss_agg_mode) and of its fake; ``_run_fused`` passes it.

_CONFIG_INTS = ("family", "opt", "gamma_mode", "gamma_rule", "needs_stats", "per_row", "sign_groups", "dp_size",
                "write_grad", "kl_type", "extra_terms", "correction")
_CONFIG_FLOATS = ("clamp", "rho_min", "fixed_a", "fixed_b", "range_a_lo", "range_a_hi", "range_b_lo",
                  "range_b_hi", "global_token_count", "global_batch_size", "loss_scale_factor",
                  "kl_coef", "w_lo", "w_hi", "w_low_metric", "x_lo", "x_hi", "select_ratio")  # + params


def encode_config(fam: KernelFamily, agg: AggConfig, kl: KLConfig, clamp: float, write_grad: bool,
                  correction: tuple = NO_CORRECTION) -> tuple:
    """(loss_agg_mode, ints, floats): the op's configuration as custom-op arguments, ints
    and floats in the order of ``_CONFIG_INTS`` and ``_CONFIG_FLOATS`` + the family's
    runtime floats. A count given as a tensor is an op input; it and a missing number are −1.
    A float may be a ``torch.SymFloat`` (see :func:`split_symbolic`). ``correction``: the
    rollout correction's (CORRECTION, floats) (``params.correction_args``)."""
    ints = [list(FAMILIES).index(fam.name), fam.opt, GAMMA_MODES.index(fam.gamma_mode), int(fam.gamma_rule is not None),
            int(fam.needs_stats), int(fam.per_row), int(fam.sign_groups), agg.dp_size, int(write_grad), kl.code,
            fam.extra_terms, correction[0]]
    counts = [-1.0 if v is None or isinstance(v, torch.Tensor) else as_number(v)
              for v in (agg.global_token_count, agg.global_batch_size, agg.loss_scale_factor)]
    floats = [as_number(clamp), *(fam.gamma_rule or GammaRule()).as_tuple(), *counts, as_number(kl.kl_coef),
              *correction[1], as_number(fam.select_ratio), *fam.params]
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
    """(KernelFamily, AggConfig, KLConfig, clamp, write_grad, correction) back from :func:`encode_config`."""
    i = dict(zip(_CONFIG_INTS, ints, strict=True))
    f = dict(zip(_CONFIG_FLOATS, floats))
    rule = GammaRule(f["rho_min"], f["fixed_a"], f["fixed_b"], (f["range_a_lo"], f["range_a_hi"]),
                     (f["range_b_lo"], f["range_b_hi"])) if i["gamma_rule"] else None
    fam = bind(KernelFamily(tuple(floats[len(_CONFIG_FLOATS):]), i["opt"], rule, GAMMA_MODES[i["gamma_mode"]],
                            bool(i["needs_stats"]), bool(i["per_row"]), bool(i["sign_groups"]), i["extra_terms"],
                            select_ratio=f["select_ratio"]),
               list(FAMILIES)[i["family"]])
    gtc, gbs, lsf = (None if f[k] < 0 else f[k] for k in ("global_token_count", "global_batch_size",
                                                          "loss_scale_factor"))
    agg = AggConfig(loss_agg_mode, i["dp_size"], global_token_count if global_token_count is not None else gtc,
                    global_batch_size if global_batch_size is not None else gbs, lsf)
    kl = KLConfig.from_code(f["kl_coef"], i["kl_type"])
    correction = (i["correction"], tuple(f[k] for k in ("w_lo", "w_hi", "w_low_metric", "x_lo", "x_hi")))
    return fam, agg, kl, f["clamp"], bool(i["write_grad"]), correction


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
    fam, agg, kl, clamp, write_grad, correction = decode_config(loss_agg_mode, ints, floats, global_token_count,
                                                                global_batch_size)
    x = Inputs(log_prob, old_log_prob, advantages, response_mask, log_prob.shape, cu_seqlens, rollout,
               ref_log_prob)
    process_group = torch.distributed.distributed_c10d._resolve_process_group(group) if group else None
    plan = plan_launches(x, fam, agg, clamp, write_grad, gamma, process_group, kl, correction)
    for step in plan.steps:
        step()
    neg_phi = plan.neg_phi if write_grad else launch.empty_buffer((0,), plan.loss.dtype, log_prob.device)
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
              (rows if mode in SEQ_AGG_MODES else 0,)]
    return tuple(lp.new_empty(shape, dtype=acc_dtype(lp.dtype)) for shape in shapes)


def _policy_loss_backward(neg_phi: torch.Tensor, grad_scale: torch.Tensor, grad_loss: torch.Tensor,
                          row_count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], shape: list[int],
                          dtype: torch.dtype, per_row: bool) -> torch.Tensor:
    """∂loss/∂log_prob (``shape``, ``dtype``) = −m·φ · s · grad_loss: one launch."""
    grad = launch.empty_buffer(shape, dtype, neg_phi.device)
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


def run_fused(x: Inputs, mask, gamma, fam: KernelFamily, agg: AggConfig, kl: KLConfig, clamp: float,
              write_grad: bool, process_group=None, correction: tuple = NO_CORRECTION) -> tuple:
    """(loss, metric vector) from the custom op; old_log_prob, advantages, the mask, the
    rollout weights and ref_log_prob enter detached, so the loss requires grad exactly when
    log_prob does. ``correction``: the rollout correction's (CORRECTION, floats)."""
    mode, ints, floats = encode_config(fam, agg, kl, clamp, write_grad, correction)
    floats, symbolic, index = split_symbolic(floats)
    counts = [v if isinstance(v, torch.Tensor) else None for v in (agg.global_token_count, agg.global_batch_size)]
    detached = [None if t is None else t.detach() for t in (x.old_log_prob, x.advantages, mask)]
    optional = [None if t is None else t.detach() for t in (x.rollout, x.ref_log_prob)]
    group = process_group.group_name if process_group is not None else ""
    loss, metrics, *_saved = _FusedPolicyLoss.apply(x.log_prob, *detached, x.cu_seqlens, gamma, *counts, *optional,
                                                    symbolic, mode, ints, floats, index, group)
    return loss, metrics
