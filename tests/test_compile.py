"""The fused op as a PyTorch custom op (issue 12): torch.compile, torch.func, CUDA
graphs, threads, double backward, on the kernel path (interpreter).

* ``isreshape_triton::policy_loss`` / ``policy_loss_backward`` pass ``opcheck``
  (schema, fake shapes, autograd registration, AOT dispatch with dynamic shapes);
  the configuration encoding round-trips for every family;
* ``torch.compile(fullgraph=True)`` of a training step (a tiny policy, its
  log-probs, ``irt.policy_loss``) matches eager, with no graph break and no
  recompilation when the batch values or float parameters change (after the first
  change, floats are symbolic and reach the op as a tensor), never a stale result;
* ``torch.func.grad`` equals autograd's gradient;
* the forward + backward make no sync and allocate only buffers whose sizes come
  from the shapes (CPU), and capture in a CUDA graph and replay (GPU only);
* two threads give the results of sequential calls;
* double backward raises a clear RuntimeError.
"""
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch._dynamo.utils import counters

import isreshape_triton as irt
from isreshape_triton import custom_op, launch
from isreshape_triton.families import kernel_family
from isreshape_triton.params import AggConfig, KLConfig
from isreshape_triton.dev.profiling import count_work

from _cases import FAMILY_CONFIGS, make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # ``python tests/test_compile.py`` runs the CUDA-graph check as a script
    sys.path.insert(0, ROOT)

from bench.gpu_check import capture_policy_step  # noqa: E402

V = 11  # vocabulary of the tiny policy


def _packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n = int(cu[-1])
    lp = -3 * torch.rand(n, generator=g)
    return (lp, lp + 0.5 * torch.randn(n, generator=g), torch.randn(len(lengths), generator=g),
            torch.rand(n, generator=g) > 0.2, cu)


class TinyPolicy(torch.nn.Module):
    """log π(y_t) of token labels from a linear head over fixed features."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(5, V)
        torch.nn.init.normal_(self.head.weight, std=0.3)

    def forward(self, features, labels):
        logp = torch.log_softmax(self.head(features), dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _step_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(*shape, 5, generator=g)
    labels = torch.randint(0, V, shape, generator=g)
    return features, labels, g


def _run_step(step, model, features, labels, rest, kwargs):
    model.zero_grad(set_to_none=True)
    loss, metrics = step(model, features, labels, *rest, **kwargs)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, model.head.weight.grad.clone()


def _assert_same(a, b, rtol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=rtol, equal_nan=True)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=rtol, atol=rtol, equal_nan=True, msg=k)
    torch.testing.assert_close(a[2], b[2], rtol=rtol, atol=rtol, equal_nan=True)


# ============================================================================ the custom ops
def _op_args(loss_type="is_reshape_sign", agg="seq-mean-token-mean", packed=False, **opts):
    fam = kernel_family(loss_type, irt.make_params(loss_type, **opts))
    mode, ints, floats = custom_op.encode_config(fam, AggConfig(agg), KLConfig(), 20.0, True)
    if packed:
        lp, olp, adv, mask, cu = _packed((7, 0, 12, 3))
    else:
        (lp, olp, adv, mask), cu = make_batch(3, 9, seed=2), None
    return (lp.requires_grad_(), olp, adv, mask, cu, None, None, None, None, None, None, mode, ints, floats, [],
            "")


@pytest.mark.parametrize("loss_type,agg,packed,opts", [
    ("sapo", "seq-mean-token-mean", False, {}),
    ("vespo", "seq-mean-token-sum-norm", True, {}),
    ("is_reshape", "token-mean", True, {"gamma_granularity": "sequence"}),
])
def test_opcheck(loss_type, agg, packed, opts):
    """Schema, fake implementation (shapes and dtypes of every output), autograd
    registration and AOT dispatch with dynamic shapes, for the forward and backward ops."""
    args = _op_args(loss_type, agg, packed, **opts)
    torch.library.opcheck(torch.ops.isreshape_triton.policy_loss.default, args)
    loss, metrics, neg_phi, grad_scale, row_count = torch.ops.isreshape_triton.policy_loss(*args)
    lp = args[0]
    back = (neg_phi, grad_scale, torch.tensor(1.5), row_count, args[4], list(lp.shape), lp.dtype,
            agg == "seq-mean-token-mean")
    torch.library.opcheck(torch.ops.isreshape_triton.policy_loss_backward.default, back)


def test_op_symbolic_floats_replace_their_places():
    """Floats given as the float64 tensor of ``split_symbolic`` (how a traced float reaches
    the op under torch.compile) give the results of the same floats given as numbers."""
    args = list(_op_args("is_reshape_sign", "seq-mean-token-sum", gamma="ess_exact"))
    floats = args[-3]
    index = [0, 1, len(floats) - 1]  # clamp, rho_min, the last family float
    moved = [0.0 if i in index else v for i, v in enumerate(floats)]
    symbolic = args[:10] + [torch.tensor([floats[i] for i in index], dtype=torch.float64)] + args[11:13] + [moved, index, ""]
    torch.library.opcheck(torch.ops.isreshape_triton.policy_loss.default, tuple(symbolic))
    got, want = torch.ops.isreshape_triton.policy_loss(*symbolic), torch.ops.isreshape_triton.policy_loss(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_op_called_directly_is_differentiable():
    """The op's own autograd registration (``torch.ops.isreshape_triton.policy_loss``) gives
    the gradient of ``irt.policy_loss``."""
    args = _op_args("sapo", "seq-mean-token-sum")
    lp = args[0]
    (direct,) = torch.autograd.grad(torch.ops.isreshape_triton.policy_loss(*args)[0], lp)
    (api,) = torch.autograd.grad(irt.policy_loss(lp, *args[1:4], "sapo", "seq-mean-token-sum")[0], lp)
    assert torch.equal(direct, api)


@pytest.mark.parametrize("loss_type,opts", FAMILY_CONFIGS)
def test_config_encoding_round_trips(loss_type, opts):
    fam = kernel_family(loss_type, irt.make_params(loss_type, **opts))
    for agg, kl in ((AggConfig("token-mean"), KLConfig()),
                    (AggConfig("seq-mean-token-sum-norm", 4, 1e-44, 7.0, 3.5), KLConfig(0.25, "kl")),
                    (AggConfig("token-sum", 2, torch.tensor(9.0), None, 0.0), KLConfig(1e-3, "mse")),
                    (AggConfig("token-mean"), KLConfig(0.5, "low_var_kl+")),
                    (AggConfig("seq-mean-token-mean"), KLConfig(0.5, "low_var_kl", "ratio")),
                    (AggConfig("token-mean"), KLConfig(0.5, "kl", "unbiased"))):
        mode, ints, floats = custom_op.encode_config(fam, agg, kl, 17.5, False)
        assert all(type(i) is int for i in ints) and all(type(f) is float for f in floats)
        tensors = [v if isinstance(v, torch.Tensor) else None for v in (agg.global_token_count,
                                                                        agg.global_batch_size)]
        fam2, agg2, kl2, clamp, write_grad, _ = custom_op.decode_config(mode, ints, floats, *tensors)
        assert (fam2, agg2, kl2, clamp, write_grad) == (fam, agg, kl, 17.5, False)


# ============================================================================ torch.compile
def _policy_step(model, features, labels, old_log_prob, advantages, mask, loss_type="is_reshape",
                 agg="token-mean", **kwargs):
    return irt.policy_loss(model(features, labels), old_log_prob, advantages, mask, loss_type, agg, **kwargs)


def _padded_case(seed):
    features, labels, g = _step_inputs((4, 13), seed)
    old = -3 * torch.rand(4, 13, generator=g)
    return features, labels, (old, torch.randn(4, 13, generator=g), torch.rand(4, 13, generator=g) > 0.3), {}


def _packed_case(seed):
    lp, olp, adv, mask, cu = _packed((9, 0, 20, 4), seed)
    features, labels, _ = _step_inputs(lp.shape, seed)
    g = torch.Generator().manual_seed(seed + 100)
    extra = {"cu_seqlens": cu, "global_batch_size": torch.tensor(6.0),
             "rollout_is_weights": 0.5 + torch.rand(lp.shape, generator=g), "ref_log_prob": olp - 0.1,
             "kl_coef": 0.05, "kl_type": "k3"}
    return features, labels, (olp, adv, mask), extra


COMPILE_CASES = [
    ("is_reshape_sign", "token-mean", {}, _padded_case),  # statistics: two forward launches
    # packed, a count as a device tensor, rollout IS weights, the KL term
    ("vespo", "seq-mean-token-sum-norm", {}, _packed_case),
    ("is_reshape", "seq-mean-token-mean", {"gamma": "psis"}, _padded_case),  # torch ops before the op
]


@pytest.mark.parametrize("loss_type,agg,opts,case", COMPILE_CASES, ids=[c[0] + "-" + c[1] for c in COMPILE_CASES])
def test_compiled_training_step_fullgraph(loss_type, agg, opts, case):
    """One graph, no graph break, eager results; new batch values (and masks) never recompile."""
    torch._dynamo.reset()
    counters.clear()
    model = TinyPolicy()
    compiled = torch.compile(_policy_step, backend="aot_eager", fullgraph=True)
    for seed in range(3):
        features, labels, rest, extra = case(seed)
        kwargs = dict(loss_type=loss_type, agg=agg, **opts, **extra)
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            got = _run_step(compiled, model, features, labels, rest, kwargs)
        _assert_same(got, _run_step(_policy_step, model, features, labels, rest, kwargs))
        assert torch.isfinite(got[0]) and got[2].abs().sum() > 0
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("options", [
    {"advantages": None, "response_mask": None},  # SFT over every token
    {"clip_ratio_c": None},  # a family parameter set to None
    {"rollout_correction": irt.RolloutCorrection(level="sequence", weight_max=None, reject="k2", reject_max=0.1)},
])
def test_compiled_call_with_none_arguments_and_a_correction(options):
    """``None`` arguments (missing advantages or mask, an option turned off) and a
    ``RolloutCorrection`` cross the boundary under fullgraph=True: one graph, eager results
    (``nonstrict_trace`` refuses a bare ``None``: the boundary carries it as a leafless node)."""
    torch._dynamo.reset()
    counters.clear()
    lp, olp, adv, mask = make_batch(3, 10, seed=5)
    args = {"advantages": adv, "response_mask": mask, **{k: options[k] for k in ("advantages", "response_mask")
                                                          if k in options}}
    kwargs = {k: v for k, v in options.items() if k not in args}
    if "rollout_correction" in kwargs:
        kwargs["rollout_log_prob"] = olp - 0.1 * torch.randn(olp.shape, generator=torch.Generator().manual_seed(1))

    def step(x):
        return irt.policy_loss(x, olp, args["advantages"], args["response_mask"], "ppo_clip", **kwargs)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got, want = _loss_and_grad(compiled, lp), _loss_and_grad(step, lp)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.parametrize("loss_type,name,values", [
    ("sapo", "tau_pos", (1.0, 2.5, 0.7, 3.0)),
    ("is_reshape", "rho_min", (0.3, 0.5, 0.6, 0.2)),  # with gamma="psis": torch ops before the op
    ("is_reshape_var", "gamma", (0.5, 0.7, 0.3, 0.9)),  # fixed γ: validated by range guards
])
def test_compiled_float_parameter_changes_do_not_recompile(loss_type, name, values):
    """A float argument of the compiled function (a schedule: a family parameter, the clamp,
    kl_coef) changing every step: Dynamo compiles the first value, then one graph with the
    floats symbolic, which every later value reuses (no recompile) and which gives that
    value's loss and gradient exactly, never a stale one. A bad value still raises."""
    torch._dynamo.reset()
    counters.clear()
    lp, olp, adv, mask = make_batch(3, 10, seed=4)
    opts = {"gamma": "psis"} if loss_type == "is_reshape" else {}

    def step(x, v, clamp):
        return irt.policy_loss(x, olp, adv, mask, loss_type, **{name: v}, **opts, log_ratio_clamp=clamp,
                               ref_log_prob=olp - 0.2, kl_coef=0.1 * v)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for i, v in enumerate(values):
        with torch._dynamo.config.patch(error_on_recompile=i > 1):
            got, want = _loss_and_grad(compiled, lp, v, 20.0 - i), _loss_and_grad(step, lp, v, 20.0 - i)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert counters["stats"]["unique_graphs"] == 2  # the first values, then symbolic floats
    assert not counters["graph_break"]
    with pytest.raises(Exception) as info:  # a bad value: the validation error names it
        compiled(lp, -1.0, 20.0)
    e = info.value
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    assert isinstance(e, ValueError) and name in str(e) and "-1.0" in str(e)


def _loss_and_grad(fn, lp, *args):
    x = lp.clone().requires_grad_()
    loss = fn(x, *args)
    loss.backward()
    return loss.detach(), x.grad


def test_compiled_new_shapes_compile_one_dynamic_graph():
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda *b: irt.policy_loss(*b, "vespo", "seq-mean-token-mean")[0],
                             backend="aot_eager", fullgraph=True)
    for B, T in ((3, 8), (4, 11), (2, 19)):
        batch = make_batch(B, T, seed=B)
        assert torch.equal(compiled(*batch), irt.policy_loss(*batch, "vespo", "seq-mean-token-mean")[0])
    assert counters["stats"]["unique_graphs"] == 2  # static, then dynamic shapes


def test_compiled_policy_loss_module_and_errors():
    torch._dynamo.reset()
    lp, olp, adv, mask = make_batch(3, 10, seed=5)
    module = irt.PolicyLoss("ppo_clip", "seq-mean-token-mean", clip_ratio_high=0.28)
    compiled = torch.compile(lambda x: module(x, olp, adv, mask, clip_ratio_low=0.1), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(lp)[0], module(lp, olp, adv, mask, clip_ratio_low=0.1)[0])
    bad = torch.compile(lambda x: irt.policy_loss(x, olp, adv, mask, rho_min=1.5), backend="aot_eager",
                        fullgraph=True)
    with pytest.raises(Exception) as info:  # Dynamo reports it; the validation error is the root cause
        bad(lp)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert isinstance(chain[-1], ValueError) and "rho_min" in str(chain[-1])


# ============================================================================ torch.func
@pytest.mark.parametrize("loss_type,agg,opts", [("is_reshape", "token-mean", {}),
                                                ("vespo", "seq-mean-token-mean", {})])
def test_func_grad_equals_autograd(loss_type, agg, opts):
    lp, olp, adv, mask = make_batch(4, 17, seed=6)

    def loss_fn(x):
        loss, metrics = irt.policy_loss(x, olp, adv, mask, loss_type, agg, **opts)
        return loss, metrics

    grad, (value, metrics) = torch.func.grad_and_value(loss_fn, has_aux=True)(lp)
    x = lp.clone().requires_grad_()
    loss, ref_metrics = loss_fn(x)
    (ref,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, ref) and torch.equal(value, loss.detach())
    assert all(torch.equal(metrics[k], ref_metrics[k]) for k in ref_metrics)
    assert torch.equal(torch.func.grad(lambda x: loss_fn(x)[0])(lp), ref)


# ============================================================================ graphs, threads
@pytest.fixture
def recorded_buffers(monkeypatch):
    """Every buffer the op allocates, as (shape, dtype), in order."""
    calls = []
    original = launch.empty_buffer

    def record(shape, dtype, device):
        calls.append((tuple(shape), dtype))
        return original(shape, dtype, device)

    monkeypatch.setattr(launch, "empty_buffer", record)
    return calls


def _data_variants(B, T, seed):
    """Same shapes, different values: plain, extreme ratios and empty rows, non-finite at
    counted tokens, all masked."""
    lp, olp, adv, mask = make_batch(B, T, seed=seed)
    yield lp, olp, adv, mask
    yield make_batch(B, T, special="extreme", seed=seed + 1)[:3] + (mask.flip(0),)
    bad = lp.clone()
    bad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    yield bad, olp, adv, torch.ones_like(mask)
    yield lp, olp, adv, torch.zeros_like(mask)


@pytest.mark.parametrize("loss_type,agg,opts", [("is_reshape_sign", "seq-mean-token-mean", {}),
                                                ("is_reshape", "token-sum", {"gamma": "ess_exact"}),
                                                ("vespo", "seq-mean-token-sum", {}),
                                                ("is_reshape_tr", "token-mean", {})])
def test_allocations_depend_on_shapes_only_and_no_sync(loss_type, agg, opts, recorded_buffers):
    """What CUDA-graph capture needs, checked on the CPU: forward + backward make no sync
    (strict detector), and allocate the same buffers whatever the values (NaN, ±inf, all
    masked...), so a captured graph's memory plan holds for every replay."""
    launch.completion_ticket(torch.device("cpu"))  # once per device and thread, before any capture
    seen = []
    for lp, olp, adv, mask in _data_variants(3, 21, seed=7):
        recorded_buffers.clear()
        x = lp.clone().requires_grad_()
        with count_work(strict=True) as work:
            loss, _ = irt.policy_loss(x, olp, adv, mask, loss_type, agg, **opts)
            loss.backward()
        assert work.syncs == 0
        seen.append((list(recorded_buffers), work.allocs, work.ops.alloc_bytes, list(work.ops.ops)))
    assert all(s == seen[0] for s in seen[1:]), seen
    assert seen[0][3] == ["aten::ones_like"]  # the rest is Triton launches into these buffers


def _cuda_graph_check():
    """Capture forward + backward in a CUDA graph, replay on new data, compare with eager
    (run without the interpreter: ``python tests/test_compile.py``)."""
    torch.manual_seed(0)
    for loss_type, agg, opts in (("is_reshape_sign", "token-mean", {}), ("vespo", "seq-mean-token-mean", {}),
                                 ("is_reshape", "seq-mean-token-sum",
                                  {"gamma": "ess_exact", "gamma_granularity": "sequence"})):
        def batch(seed):
            return [t.cuda() if t is not None else None for t in make_batch(8, 300, seed=seed)]

        static = batch(0)
        lp = static[0].requires_grad_()
        graph, loss, metrics = capture_policy_step(static, loss_type, agg, **opts)
        for seed in (1, 2):
            new = batch(seed)
            with torch.no_grad():
                for s, n in zip(static, new):
                    s.copy_(n)
            graph.replay()
            x = new[0].clone().requires_grad_()
            ref_loss, ref_metrics = irt.policy_loss(x, *new[1:], loss_type, agg, **opts)
            ref_loss.backward()
            assert torch.equal(loss, ref_loss.detach()), (loss_type, loss, ref_loss)
            assert torch.equal(lp.grad, x.grad), loss_type
            assert all(torch.equal(metrics[k], ref_metrics[k]) for k in metrics), loss_type
    print("CUDA graph capture and replay: OK")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, __file__], env=env, check=True, timeout=900,
                   cwd=os.path.dirname(os.path.abspath(__file__)))


THREAD_CASES = [("is_reshape_sign", "seq-mean-token-mean", {}), ("vespo", "token-mean", {}),
                ("ppo_clip", "token-sum", {}), ("is_reshape_var", "token-mean", {"gamma_granularity": "sequence"}),
                ("sapo", "seq-mean-token-mean", {}), ("is_reshape", "seq-mean-token-sum", {})]


def _call(i):
    loss_type, agg, opts = THREAD_CASES[i]
    lp, olp, adv, mask = make_batch(3, 20 + i, seed=i)
    x = lp.clone().requires_grad_()
    loss, metrics = irt.policy_loss(x, olp, adv, mask, loss_type, agg, **opts)
    loss.backward()
    return loss.detach(), metrics, x.grad


def test_two_threads_match_sequential_calls():
    """The interpreter is serialised per launch (``launch._INTERPRETER_LOCK``); every thread has
    its own completion ticket, so interleaved calls give the sequential results bit for bit."""
    n = len(THREAD_CASES)
    sequential = [_call(i) for i in range(n)]
    results, errors = [None] * n, []

    def worker(indices):
        try:
            for i in indices:
                results[i] = _call(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(range(k, n, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, sequential):
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])


# ============================================================================ double backward
@pytest.mark.parametrize("loss_type", ["is_reshape", "ppo_clip"])
def test_double_backward_refused_with_a_clear_error(loss_type):
    """create_graph=True gives the ordinary gradient, tied to log_prob by a node that refuses
    to be differentiated: a gradient penalty or a second grad raises, never drops silently
    (main returned a gradient without a graph)."""
    lp, olp, adv, mask = make_batch(3, 8, seed=8)
    x = lp.clone().requires_grad_()
    loss = irt.policy_loss(x, olp, adv, mask, loss_type)[0]
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.requires_grad
    (plain,) = torch.autograd.grad(irt.policy_loss(x, olp, adv, mask, loss_type)[0], x)
    assert torch.equal(g.detach(), plain)
    with pytest.raises(RuntimeError, match="does not support double backward.*policy-gradient weight"):
        torch.autograd.grad(g.square().sum(), x)
    loss = irt.policy_loss(x, olp, adv, mask, loss_type)[0]
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        (loss + g.square().sum()).backward()
    (loss + g.detach().square().sum()).backward()  # the gradient as data: fine
    assert torch.equal(x.grad, plain)


def test_readme_snippet():
    """The snippet of the README's compile section runs as written, on the kernel path,
    with the CPU's aot_eager backend."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    marker = "<!-- tested: tests/test_compile.py::test_readme_snippet -->"
    text = (root / "README.md").read_text()
    assert marker in text
    code = re.search(r"```python\n(.*?)```", text.split(marker, 1)[1], re.S).group(1)
    assert "torch.compile(fullgraph=True)" in code
    torch._dynamo.reset()
    counters.clear()
    scope = {}
    exec(code.replace("torch.compile(fullgraph=True)", 'torch.compile(fullgraph=True, backend="aot_eager")'), scope)
    assert torch.isfinite(scope["loss"]) and scope["model"].weight.grad is not None
    assert scope["grad"].shape == (4, 50) and counters["stats"]["unique_graphs"] == 1


if __name__ == "__main__":
    _cuda_graph_check()
