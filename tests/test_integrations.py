"""The trainer adapters against the real packages (installed by ./run.sh): verl 0.9.1,
TRL 1.16.0 and OpenRLHF 0.11.2's ``PolicyLoss`` (see ``load_openrlhf_loss``). Every
adapter call runs the Triton kernels in the interpreter (launches > 0)."""
import importlib
import importlib.metadata
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import isreshape_triton as irt
from isreshape_triton.dev.profiling import LaunchCounter

AGG_MODES = irt.AGG_MODES


def batch(B=4, T=7, seed=0, dtype=torch.float32):
    """log_prob (leaf), old_log_prob, advantages, mask (one empty row), rollout weights, ref."""
    g = torch.Generator().manual_seed(seed)
    lp = -1.0 + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    old = lp + 0.25 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False
    mask[0, 0] = True
    weights = torch.rand(B, T, generator=g, dtype=dtype) * 1.5 + 0.25
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=dtype)
    return lp.requires_grad_(), old, adv, mask, weights, ref


def loss_and_grad(fn, lp, *args, **kwargs):
    x = lp.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), x.grad, out


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- verl
@pytest.fixture(scope="module")
def verl():
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    from isreshape_triton.integrations import verl as adapter

    return types.SimpleNamespace(core=core_algos, ActorConfig=ActorConfig, adapter=adapter)


def actor_config(verl, loss_mode="ppo_clip_irt", irt_params=None, batch_info=None, policy_loss=None, **kwargs):
    policy_loss = verl.adapter.IRTPolicyLossConfig(loss_mode=loss_mode, irt=dict(irt_params or {}),
                                                   **(policy_loss or {}))
    cfg = verl.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                           policy_loss=policy_loss, **kwargs)
    cfg.global_batch_info.update(batch_info or {})
    return cfg


GLOBAL_INFO = {"dp_size": 2, "batch_num_tokens": torch.tensor(40.0), "global_batch_size": torch.tensor(9.0),
               "loss_scale_factor": 11}


def test_verl_registry_returns_ours(verl):
    """verl's own get_policy_loss_fn finds every mode and family; the entry point made `import verl`
    load us."""
    names = {"is_reshape", "is_reshape_sign", "is_reshape_tr", "is_reshape_var", "ppo_clip_irt", "vespo_irt"}
    assert set(verl.adapter.VERL_NAMES.values()) == names
    names |= {f"{mode}_irt" for mode in verl.adapter.VERL_MODES}
    assert set(verl.adapter.REGISTERED) == names
    assert not names & set(verl.core.POLICY_LOSS_REGISTRY) - set(verl.adapter.POLICY_LOSS_FNS)
    assert set(verl.adapter.VERL_MODES) <= set(verl.core.POLICY_LOSS_REGISTRY)
    for name in names:
        assert verl.core.get_policy_loss_fn(name) is verl.adapter.POLICY_LOSS_FNS[name]
    plugins = importlib.metadata.entry_points(group="verl.plugins")
    assert "isreshape_triton.integrations.verl" in {ep.value for ep in plugins}


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_ppo_clip_irt_equals_vanilla(verl, mode, with_weights):
    """ppo_clip_irt == verl's vanilla: loss, gradient and verl's metrics, with global batch info
    (0-dim tensor counts, dp_size 2) and rollout IS weights; asymmetric clip, dual clip."""
    lp, old, adv, mask, weights, _ = batch(seed=AGG_MODES.index(mode))
    adv[2, :3] = -2.0
    old[2, :3] = lp[2, :3].detach() - 1.5  # w = e^1.5 > clip_ratio_c = 3 with A < 0: the dual clip acts
    cfg = actor_config(verl, batch_info=GLOBAL_INFO, clip_ratio_high=0.28)
    w = weights if with_weights else None
    want = loss_and_grad(lambda x: verl.core.get_policy_loss_fn("vanilla")(old, x, adv, mask, mode, cfg, w), lp)
    fn = verl.core.get_policy_loss_fn("ppo_clip_irt")
    with LaunchCounter() as launches:
        got = loss_and_grad(lambda x: fn(old, x, adv, mask, mode, cfg, w), lp)
    assert launches.launches > 0
    close(got[0], want[0])
    close(got[1], want[1])
    for key, value in want[2][1].items():
        assert got[2][1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got[2][1]["actor/pg_clipfrac_lower"] > 0
    assert "actor/irt/w_max" in got[2][1]


# the options each verl mode reads, set so that every branch acts on the test batch
VERL_MODE_OPTIONS = {
    "vanilla": {"clip_ratio_high": 0.28},
    "sapo": {"tau_pos": 1.3, "tau_neg": 2.0},
    "gpg": {},
    "cispo": {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15},
    "gspo": {"clip_ratio_low": 0.02, "clip_ratio_high": 0.03},
    "geo_mean": {"clip_ratio_low": 0.1, "clip_ratio_high": 0.15},
    "dro": {"policy_loss": {"dro_beta": 0.4}},
    "dppo_tv": {"clip_ratio_low": 0.03, "clip_ratio_high": 0.05},
    "dppo_kl": {"clip_ratio_low": 0.01, "clip_ratio_high": 0.02},
    # clip_cov: every candidate dropped (verl's random choice is then no choice; see the test below)
    "clip_cov": {"clip_ratio_high": 0.28, "policy_loss": {"clip_cov_ratio": 1.0, "clip_cov_lb": 0.05,
                                                          "clip_cov_ub": 3.0}},
    "kl_cov": {"policy_loss": {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.5}},
}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("verl_mode", list(VERL_MODE_OPTIONS))
def test_verl_mode_irt_equals_verl_mode(verl, verl_mode, mode):
    """<mode>_irt == verl's own <mode>: loss, gradient and every metric verl returns, for every
    aggregation mode with global batch info (0-dim tensor counts, dp_size 2) and rollout IS
    weights; a few tokens with w = e^1.5 beyond clip_ratio_c = 3 (dual clip, DPPO's truncation)."""
    assert set(VERL_MODE_OPTIONS) == set(verl.adapter.VERL_MODES) - {"bypass_mode"}  # its own test below
    seed = AGG_MODES.index(mode) + 7 * list(VERL_MODE_OPTIONS).index(verl_mode)
    lp, old, adv, mask, weights, _ = batch(seed=seed)
    adv[2, :3] = -2.0
    old[2, :3] = lp[2, :3].detach() - 1.5
    adv[3, 4:] = 1.5
    old[3, 4:] = lp[3, 4:].detach() - 1.5
    cfg = actor_config(verl, loss_mode=f"{verl_mode}_irt", batch_info=GLOBAL_INFO, **VERL_MODE_OPTIONS[verl_mode])
    want = loss_and_grad(lambda x: verl.core.get_policy_loss_fn(verl_mode)(old, x, adv, mask, mode, cfg, weights), lp)
    fn = verl.core.get_policy_loss_fn(f"{verl_mode}_irt")
    with LaunchCounter() as launches:
        got = loss_and_grad(lambda x: fn(old, x, adv, mask, mode, cfg, weights), lp)
    assert launches.launches > 0
    close(got[0], want[0])
    close(got[1], want[1])
    for key, value in want[2][1].items():
        assert got[2][1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert "actor/irt/w_max" in got[2][1]
    if verl_mode in ("clip_cov", "kl_cov"):
        assert got[2][1]["actor/irt/cov_selected"] > 0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_verl_clip_cov_irt_draws_as_verl_would(verl, mode, monkeypatch):
    """With more candidates than clip_cov drops, clip_cov_irt drops the clip_num of smallest seeded
    key: verl's own clip_cov equals it when its randperm returns the candidates in key order."""
    from isreshape_triton.families.clip_cov import random_key

    lp, old, adv, mask, weights, _ = batch(B=6, T=40, seed=11 + AGG_MODES.index(mode))
    options = {"clip_cov_ratio": 0.02, "clip_cov_lb": 0.02, "clip_cov_ub": 3.0}
    cfg = actor_config(verl, loss_mode="clip_cov_irt", irt_params={"seed": 12345}, batch_info=GLOBAL_INFO,
                       policy_loss=options)
    key = random_key(12345, torch.arange(lp.numel()).reshape(lp.shape))
    randperm = torch.randperm

    def in_key_order(n, **kwargs):  # verl's candidates come in row-major order (torch.nonzero)
        cov = (adv - adv[mask].mean()) * (lp.detach() - lp.detach()[mask].mean())
        w = torch.exp(lp.detach() - old)
        clipped = -adv * torch.clamp(w, 0.8, 1.2) > -adv * w
        cand = mask & ~clipped & (cov > options["clip_cov_lb"]) & (cov < options["clip_cov_ub"])
        assert int(cand.sum()) == n > max(1, int(int(mask.sum()) * 0.02))  # a choice to make
        return torch.argsort(key[cand], stable=True)

    monkeypatch.setattr(torch, "randperm", in_key_order)
    want = loss_and_grad(lambda x: verl.core.get_policy_loss_fn("clip_cov")(old, x, adv, mask, mode, cfg, weights), lp)
    monkeypatch.setattr(torch, "randperm", randperm)
    got = loss_and_grad(lambda x: verl.core.get_policy_loss_fn("clip_cov_irt")(old, x, adv, mask, mode, cfg,
                                                                               weights), lp)
    close(got[0], want[0])
    close(got[1], want[1])
    for key_name, value in want[2][1].items():
        assert got[2][1][key_name] == pytest.approx(value, rel=1e-5, abs=1e-6), key_name
    n = int(mask.sum())
    assert got[2][1]["actor/pg_clipfrac"] * n == pytest.approx(max(1, int(n * 0.02)))


# verl's bypass mode: (loss_type, rollout_is, its threshold, rollout_rs, its threshold), every branch active
BYPASS_CASES = [
    ("reinforce", "token", 1.3, None, None),
    ("reinforce", "token", "0.8_1.25", "token_k1", "0.7_1.6"),
    ("reinforce", None, 2.0, "token_k2", 0.05),
    ("ppo_clip", "token", 1.3, "token_k3", 0.04),
    ("ppo_clip", None, 2.0, "token_k1", 1.15),
    ("reinforce", "sequence", 1.5, "seq_mean_k2", 0.03),
    ("reinforce", "sequence", "0.6_1.6", "seq_sum_k1", "0.6_1.6"),
    ("ppo_clip", "sequence", 1.5, "seq_max_k3", 0.06),
    ("reinforce", "sequence", 1.2, None, None),
]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("case", BYPASS_CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in BYPASS_CASES])
def test_verl_bypass_mode_irt_equals_bypass_mode(verl, case, mode):
    """bypass_mode_irt == verl's bypass_mode (old_log_prob is the rollout's; the IS weights and the
    rejection of π against it computed in the op): loss, gradient, verl's actor metrics and the
    rollout_corr metrics we share (IS mean and fractions where applied, the rejected fraction),
    for every aggregation with global batch info; the given weights are ignored, as verl does."""
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    loss_type, level, is_threshold, rs, rs_threshold = case
    seed = AGG_MODES.index(mode) + 5 * BYPASS_CASES.index(case)
    lp, old, adv, mask, weights, _ = batch(seed=seed)
    old[0] = lp[0].detach() - 0.01  # a row every criterion keeps, one (x = 0.6 per token) each rejects
    old[3] = lp[3].detach() - 0.6
    rc = RolloutCorrectionConfig(rollout_is=level, rollout_is_threshold=is_threshold, rollout_rs=rs,
                                 rollout_rs_threshold=rs_threshold, bypass_mode=True, loss_type=loss_type)
    cfg = actor_config(verl, loss_mode="bypass_mode_irt", batch_info=GLOBAL_INFO, clip_ratio_high=0.28,
                       policy_loss={"rollout_correction": rc})
    want = loss_and_grad(lambda x: verl.core.get_policy_loss_fn("bypass_mode")(old, x, adv, mask, mode, cfg, weights),
                         lp)
    fn = verl.core.get_policy_loss_fn("bypass_mode_irt")
    with LaunchCounter() as launches:
        got = loss_and_grad(lambda x: fn(old, x, adv, mask, mode, cfg, weights), lp)
    assert launches.launches > 0
    close(got[0], want[0])
    close(got[1], want[1])
    shared = [k for k in got[2][1] if not k.startswith("actor/irt/")]
    assert {k for k in shared if k.startswith("rollout_corr/")} == {
        k for k in verl.adapter.VERL_ROLLOUT_METRICS
        if (level is not None and loss_type == "reinforce" or "rollout_is" not in k) and (rs or "_rs_" not in k)}
    assert "rollout_corr/kl" in shared
    for key in shared:
        assert got[2][1][key] == pytest.approx(want[2][1].get(key, 0.0), rel=1e-5, abs=1e-6), key
    if rs is not None:
        assert 0 < want[2][1]["rollout_corr/rollout_rs_masked_fraction"] < 1  # the rejection acts
    if level is not None:  # the weight acts
        assert want[2][1]["rollout_corr/rollout_is_ratio_fraction_high"] + want[2][1][
            "rollout_corr/rollout_is_ratio_fraction_low"] > 0


@pytest.mark.parametrize("options", [{"rollout_rs": "token_k1,seq_mean_k3", "rollout_rs_threshold": "0.5_2,0.1"},
                                     {"rollout_is_batch_normalize": True}])
def test_verl_bypass_mode_irt_refuses_what_the_op_does_not_compute(verl, options):
    """Chained rejections and the batch normalization of the weights: a clear error, not another loss."""
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    lp, old, adv, mask, _, _ = batch(seed=0)
    cfg = actor_config(verl, loss_mode="bypass_mode_irt", policy_loss={"rollout_correction": RolloutCorrectionConfig(
        rollout_is="token", bypass_mode=True, **options)})
    with pytest.raises(NotImplementedError, match="use verl's bypass_mode"):
        verl.core.get_policy_loss_fn("bypass_mode_irt")(old, lp, adv, mask, "token-mean", cfg)


@pytest.mark.parametrize("loss_type, irt_params, mode", [
    ("is_reshape", {"gamma": "ess", "rho_min": 0.4}, "token-mean"),
    ("is_reshape_sign", {"neg_saturation": "truncate"}, "seq-mean-token-sum"),
    ("is_reshape_tr", {"tau_h": 2.0}, "seq-mean-token-sum-norm"),
    ("is_reshape_var", {"temperature": 3.0}, "token-sum"),
    ("vespo", {"k_pos": 1.5}, "seq-mean-token-mean"),
])
def test_verl_family_reads_config(verl, loss_type, irt_params, mode):
    """Each family through verl's registry equals the op called with the policy_loss.irt
    parameters and global_batch_info; our metrics come back under actor/irt/."""
    name = verl.adapter.VERL_NAMES[loss_type]
    lp, old, adv, mask, _, _ = batch(seed=5)
    cfg = actor_config(verl, loss_mode=name, irt_params=irt_params, batch_info=GLOBAL_INFO)
    with LaunchCounter() as launches:
        got = loss_and_grad(lambda x: verl.core.get_policy_loss_fn(name)(old, x, adv, mask, mode, cfg), lp)
    assert launches.launches > 0
    want = loss_and_grad(irt.reference.policy_loss, lp, old, adv, mask, loss_type, mode, dp_size=2,
                         global_token_count=40.0, global_batch_size=9.0, loss_scale_factor=11, **irt_params)
    close(got[0], want[0])
    close(got[1], want[1])
    metrics = got[2][1]
    assert metrics["actor/ppo_kl"] == pytest.approx(want[2][1]["ppo_kl"].item(), rel=1e-5)
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert {f"actor/irt/{k}" for k in want[2][1]} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())


def test_verl_config_from_yaml_override(verl):
    """The README switch: verl's own config conversion (Hydra instantiate of `_target_`s) builds
    an ActorConfig whose policy_loss carries the irt section, and the adapter reads it."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    yaml = """
    _target_: verl.workers.config.ActorConfig
    strategy: fsdp
    rollout_n: 1
    ppo_micro_batch_size_per_gpu: 1
    clip_ratio_high: 0.28
    policy_loss:
      _target_: isreshape_triton.integrations.verl.IRTPolicyLossConfig
      loss_mode: is_reshape
      irt: {gamma: ess, rho_min: 0.4}
    """
    cfg = omega_conf_to_dataclass(OmegaConf.create(yaml))
    assert isinstance(cfg, verl.ActorConfig)
    assert cfg.policy_loss.loss_mode == "is_reshape"
    assert verl.adapter.family_params("is_reshape", cfg) == {"gamma": "ess", "rho_min": 0.4}
    assert verl.adapter.family_params("ppo_clip_irt", cfg) == {
        "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "gamma": "ess", "rho_min": 0.4}
    with pytest.raises(TypeError, match="rho_mn"):
        bad = actor_config(verl, loss_mode="is_reshape", irt_params={"rho_mn": 0.4})
        lp, old, adv, mask, _, _ = batch()
        verl.core.get_policy_loss_fn("is_reshape")(old, lp, adv, mask, "token-mean", bad)


@pytest.mark.parametrize("full", [False, True])
def test_verl_ppo_loss_call_site(verl, full):
    """verl's real actor loss (workers.utils.losses.ppo_loss: no-padding log-probs, TensorDict
    batch with global counts; with ``full``, rollout IS weights and verl's KL loss) gives the
    same loss and gradient with loss_mode ppo_clip_irt as with vanilla."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    B, P, T = 3, 2, 5
    lens = torch.tensor([5, 3, 4])
    lp, old, adv, _, weights, ref = batch(B, T, seed=11)
    mask = torch.arange(T)[None] < lens[:, None]

    def run(loss_mode):
        x = lp.detach().clone().requires_grad_()
        # verl's no-padding layout: sequence b is P prompt + lens[b] response positions, the
        # response log-prob of token j sits at position P - 1 + j of the sequence
        pieces = []
        for b in range(B):
            pieces += [torch.zeros(P - 1), x[b, :lens[b]], torch.zeros(1)]
        flat = torch.cat(pieces)
        data = TensorDict({
            "prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, T, dtype=torch.long),
            "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1),
            "response_mask": mask.long(), "old_log_probs": old, "advantages": adv,
        }, batch_size=[B])
        if full:
            data["rollout_is_weights"], data["ref_log_prob"] = weights, ref
        tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=15, global_batch_size=6)  # as verl's engines
        cfg = actor_config(verl, loss_mode=loss_mode, use_kl_loss=full, kl_loss_coef=0.1,
                           loss_agg_mode="seq-mean-token-mean")
        with LaunchCounter() as launches:
            loss, metrics = ppo_loss(cfg, {"log_probs": flat}, data)
            loss.backward()
        return loss.detach(), x.grad, metrics, launches.launches

    want, got = run("vanilla"), run("ppo_clip_irt")
    assert want[3] == 0 and got[3] > 0
    close(got[0], want[0])
    close(got[1], want[1])
    assert got[2]["actor/ppo_kl"].aggregate() == pytest.approx(want[2]["actor/ppo_kl"].aggregate(), rel=1e-5)


@pytest.mark.parametrize("kl_type", ["k1+", "abs+", "k2+", "k3+", "low_var_kl+", "low_var_kl"])
def test_verl_kl_penalty_types(verl, kl_type):
    """The op's KL term == verl's kl_penalty (value and gradient), "+" straight-through types included."""
    lp, old, adv, mask, _, ref = batch(seed=17)
    x = lp.detach().clone().requires_grad_()
    want = verl.core.agg_loss(verl.core.kl_penalty(x, ref, kl_type), mask, "token-mean")
    want.backward()
    got = kl_part({"kl_coef": 1.0, "kl_type": kl_type}, lp, old, adv, mask, ref)
    close(got[0], want.detach())
    close(got[1], x.grad)


# ----------------------------------------------------------------------------- TRL
VOCAB = ["<pad>", "<eos>", "<unk>"] + [str(d) for d in range(10)] + ["+", "="]


@pytest.fixture(scope="module")
def trl_env(tmp_path_factory):
    """A word-level tokenizer and a tiny randomly initialised Llama, built in memory and saved to
    a temporary folder (TRL loads the KL reference model from the policy's path): no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return types.SimpleNamespace(tokenizer=tokenizer, model_path=str(path))


def make_trainer(env, cls, loss_type, beta=0.0, config=None, **kwargs):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    model = AutoModelForCausalLM.from_pretrained(env.model_path, dtype=torch.float32)
    config = {"output_dir": "/tmp/irt-trl-test", "loss_type": loss_type, "beta": beta, "epsilon": 0.2,
              "epsilon_high": 0.28, "use_bias_correction_kl": False, "per_device_train_batch_size": 4,
              "num_generations": 2, "max_completion_length": 6, "report_to": [], "use_cpu": True, "bf16": False,
              "sapo_temperature_pos": 1.2, "sapo_temperature_neg": 1.6, **(config or {})}
    args = GRPOConfig(**config)
    trainer = cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["1 + 2 =", "3 + 4 ="]}),
                  processing_class=env.tokenizer, **kwargs)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    return trainer


def trl_inputs(trainer, B=4, P=3, T=6, seed=1, with_ref=False, is_ratio=None):
    g = torch.Generator().manual_seed(seed)
    inputs = {"prompt_ids": torch.randint(3, len(VOCAB), (B, P), generator=g),
              "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": torch.randint(3, len(VOCAB), (B, T), generator=g),
              "completion_mask": (torch.arange(T)[None] < torch.tensor([6, 4, 5, 2])[:, None]).long(),
              "advantages": torch.tensor([1.0, -0.7, 0.4, -1.2]), "num_items_in_batch": torch.tensor(17.0)}
    with torch.no_grad():
        lp = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), T)[0]
    inputs["old_per_token_logps"] = lp + 0.2 * torch.randn(B, T, generator=g)
    if with_ref:
        inputs["ref_per_token_logps"] = lp + 0.3 * torch.randn(B, T, generator=g)
    if is_ratio == "token":
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(B, T, generator=g) * inputs["completion_mask"]
    elif is_ratio == "sequence":
        inputs["importance_sampling_ratio"] = 0.6 + torch.rand(B, 1, generator=g)
    return inputs


def trl_step(trainer, inputs):
    trainer.model.zero_grad()
    with LaunchCounter() as launches:
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()], launches.launches


TRL_CASES = [
    ("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}), ("sapo", {}), ("vespo", {}),
    pytest.param("grpo", {"beta": 0.05}, id="grpo-kl"),
    pytest.param("grpo", {"beta": 0.05, "config": {"use_bias_correction_kl": True}}, id="grpo-kl-bias-corrected"),
    pytest.param("dapo", {"beta": 0.1, "is_ratio": "token", "vllm": True, "config": {"use_bias_correction_kl": True}},
                 id="dapo-is-kl-bias-corrected"),
    pytest.param("dapo", {"is_ratio": "token", "vllm": True}, id="dapo-is-token"),
    pytest.param("vespo", {"is_ratio": "sequence", "beta": 0.05}, id="vespo-is-seq-kl"),
    pytest.param("cispo", {"config": {"epsilon_high": 1.1}}, id="cispo"),
    pytest.param("cispo", {"is_ratio": "token", "vllm": True, "config": {"epsilon_high": 1.05}}, id="cispo-is-token"),
    pytest.param("grpo", {"config": {"delta": 1.1}}, id="grpo-delta"),
    pytest.param("dapo", {"config": {"delta": 1.05, "epsilon_high": 0.02}}, id="dapo-delta"),
    pytest.param("luspo", {"config": {"importance_sampling_level": "sequence", "epsilon": 0.02,
                                      "epsilon_high": 0.03}}, id="luspo-seq"),
    pytest.param("luspo", {}, id="luspo-token"),
    pytest.param("grpo", {"config": {"importance_sampling_level": "sequence", "epsilon": 0.02, "epsilon_high": 0.03,
                                     "delta": 1.02}}, id="grpo-seq-delta"),
    pytest.param("dapo", {"is_ratio": "sequence", "vllm": True, "beta": 0.05,
                          "config": {"importance_sampling_level": "sequence", "epsilon": 0.02}}, id="dapo-seq-is-kl"),
]


@pytest.mark.parametrize("loss_type, case", TRL_CASES)
def test_trl_grpo_trainer_same_loss_and_grads(trl_env, loss_type, case):
    """GRPOTrainer._compute_loss (TRL's code) and IRTGRPOTrainer._compute_loss (the op) on the
    same model and inputs (a hand-made batch of 4 ragged completions, gradient accumulation 2):
    the same loss and the same gradient of every model parameter."""
    from trl import GRPOTrainer

    from isreshape_triton.integrations.trl import IRTGRPOTrainer

    beta = case.get("beta", 0.0)
    trainers = [make_trainer(trl_env, cls, loss_type, beta, config=case.get("config"))
                for cls in (GRPOTrainer, IRTGRPOTrainer)]
    for t in trainers:  # TRL applies a token/sequence IS ratio only with vLLM's correction on
        t.use_vllm = t.vllm_importance_sampling_correction = case.get("vllm", False)
    inputs = trl_inputs(trainers[0], with_ref=beta != 0.0, is_ratio=case.get("is_ratio"))
    (want, want_grads, n_want), (got, got_grads, n_got) = (trl_step(t, inputs) for t in trainers)
    assert n_want == 0 and n_got > 0
    if loss_type == "vespo":  # TRL's value is −φ·A·log π, ours the surrogate −φ·A·(log π − log π_old)
        mask = inputs["completion_mask"]
        lp = trainers[0]._get_per_token_logps_and_entropies(
            trainers[0].model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])[0].detach()
        phi = GRPOTrainer.get_gamma_weights(inputs["advantages"][:, None], lp - inputs["old_per_token_logps"],
                                            mask, inputs.get("importance_sampling_ratio"))
        normalizer = inputs["num_items_in_batch"] * 2  # × accumulation 2 / steps_per_generation 1
        want = want + (phi * inputs["advantages"][:, None] * inputs["old_per_token_logps"] * mask).sum() / normalizer
    close(got, want)
    for a, b in zip(got_grads, want_grads):
        close(a, b, tol=2e-5)
    logged = [t._metrics["train"] for t in trainers]
    assert logged[1]["entropy"] and logged[1]["irt/ppo_kl"]
    from isreshape_triton.integrations.trl import TRL_METRICS

    level = case.get("config", {}).get("importance_sampling_level", "token")
    compared = TRL_METRICS.get(trainers[1].irt_loss_type, {}) if level == "token" else {}
    for name in compared:
        assert logged[1][name] == pytest.approx(logged[0][name], rel=1e-6, abs=1e-9), name
    assert not compared or any(logged[0][name][0] > 0 for name in compared)


TRL_BONUS_CASES = [
    pytest.param("dapo", {"entropy_coef": 0.3}, id="dapo-static"),
    pytest.param("grpo", {"entropy_coef": -0.2, "beta": 0.05}, id="grpo-static-kl"),
    pytest.param("bnpo", {"use_adaptive_entropy": True, "entropy_coef": 0.1, "entropy_target": 100.0,
                          "entropy_coef_delta": 0.05}, id="bnpo-adaptive-up"),
    pytest.param("dapo", {"use_adaptive_entropy": True, "entropy_coef": 0.1, "entropy_target": 0.0,
                          "entropy_coef_min": 0.02, "entropy_coef_delta": 0.05}, id="dapo-adaptive-down"),
]


@pytest.mark.parametrize("loss_type, config", TRL_BONUS_CASES)
def test_trl_entropy_bonus(trl_env, loss_type, config):
    """TRL's entropy bonus, static and adaptive, over two optimizer steps on two batches: the
    same loss and gradients as GRPOTrainer's, the same coefficient and cached world entropy
    after each step, and the same logged entropy_coef, policy_loss and entropy (the adaptive
    cases apply no bonus at the first step, then the moved coefficient, or none)."""
    from trl import GRPOTrainer

    from isreshape_triton.integrations.trl import IRTGRPOTrainer

    config = dict(config)
    beta = config.pop("beta", 0.0)
    trainers = [make_trainer(trl_env, cls, loss_type, beta, config=config) for cls in (GRPOTrainer, IRTGRPOTrainer)]
    for seed in (1, 2):
        inputs = trl_inputs(trainers[0], seed=seed, with_ref=beta != 0.0)
        (want, want_grads, _), (got, got_grads, launches) = (trl_step(t, inputs) for t in trainers)
        assert launches > 0
        close(got, want)
        for a, b in zip(got_grads, want_grads):
            close(a, b, tol=2e-5)
        assert trainers[1].entropy_coef == pytest.approx(trainers[0].entropy_coef, abs=1e-12)
        assert trainers[1]._last_world_entropy == pytest.approx(trainers[0]._last_world_entropy, rel=1e-6)
    logged = [t._metrics["train"] for t in trainers]
    for name in ("entropy_coef", "policy_loss", "entropy"):
        assert logged[1][name] == pytest.approx(logged[0][name], rel=1e-5, abs=1e-9), name


TRL_MASK_CASES = [
    pytest.param("dapo", {"off_policy_mask_threshold": 0.02}, {}, id="dapo-opsm"),
    pytest.param("grpo", {"top_entropy_quantile": 0.5, "entropy_coef": 0.1}, {"beta": 0.05},
                 id="grpo-entropy-quantile-bonus-kl"),
    pytest.param("dapo", {"off_policy_mask_threshold": 0.0, "top_entropy_quantile": 0.3},
                 {"is_ratio": "token", "vllm": True, "sampling": True}, id="dapo-opsm-sampling-quantile-is"),
    pytest.param("grpo", {"off_policy_mask_threshold": 0.01, "importance_sampling_level": "sequence",
                          "epsilon": 0.02, "epsilon_high": 0.03}, {}, id="grpo-seq-opsm"),
]


@pytest.mark.parametrize("loss_type, config, case", TRL_MASK_CASES)
def test_trl_policy_masks(trl_env, loss_type, config, case):
    """TRL's masks of the per-token policy loss, OPSM (``off_policy_mask_threshold``, against
    vLLM's sampling log-probs when given) and ``top_entropy_quantile`` (with the entropy bonus on
    the same tokens), with a KL term and token IS ratios: the same loss and gradients as
    GRPOTrainer's, each mask dropping some tokens and keeping others."""
    from trl import GRPOTrainer

    from isreshape_triton.integrations.trl import IRTGRPOTrainer

    beta = case.get("beta", 0.0)
    trainers = [make_trainer(trl_env, cls, loss_type, beta, config=config) for cls in (GRPOTrainer, IRTGRPOTrainer)]
    for t in trainers:
        t.use_vllm = t.vllm_importance_sampling_correction = case.get("vllm", False)
    inputs = trl_inputs(trainers[0], with_ref=beta != 0.0, is_ratio=case.get("is_ratio"))
    if case.get("sampling"):
        inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.3 * torch.randn(
            inputs["old_per_token_logps"].shape, generator=torch.Generator().manual_seed(5))
    (want, want_grads, _), (got, got_grads, launches) = (trl_step(t, inputs) for t in trainers)
    assert launches > 0
    close(got, want)
    for a, b in zip(got_grads, want_grads):
        close(a, b, tol=2e-5)
    with torch.no_grad():  # the masks are active: some counted tokens dropped, some kept
        lp, ent, _ = trainers[1]._get_per_token_logps_and_entropies(
            trainers[1].model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), 6, compute_entropy=True)
        _, policy_mask = trainers[1]._policy_masks(lp, inputs["old_per_token_logps"], ent,
                                                   inputs["completion_mask"], inputs)
    kept = policy_mask.expand(lp.shape)[inputs["completion_mask"].bool()]
    assert 0 < kept.sum() < kept.numel()


@pytest.fixture(scope="module")
def trl_moe_env(trl_env, tmp_path_factory):
    """``trl_env`` with a tiny randomly initialised Mixtral (2 experts, top-1): a model with a router aux loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, num_local_experts=2, num_experts_per_tok=1,
        router_aux_loss_coef=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    path = tmp_path_factory.mktemp("tiny-mixtral")
    model.save_pretrained(path)
    return types.SimpleNamespace(tokenizer=trl_env.tokenizer, model_path=str(path))


def test_trl_router_aux_loss(trl_moe_env):
    """A MoE model's router aux loss (coefficient from its config) is added as GRPOTrainer adds
    it: the same loss, gradients and logged aux_loss, with the entropy bonus on too."""
    from trl import GRPOTrainer

    from isreshape_triton.integrations.trl import IRTGRPOTrainer

    trainers = [make_trainer(trl_moe_env, cls, "grpo", config={"entropy_coef": 0.1})
                for cls in (GRPOTrainer, IRTGRPOTrainer)]
    assert all(t.aux_loss_enabled for t in trainers)
    inputs = trl_inputs(trainers[0])
    (want, want_grads, _), (got, got_grads, launches) = (trl_step(t, inputs) for t in trainers)
    assert launches > 0
    close(got, want)
    for a, b in zip(got_grads, want_grads):
        close(a, b, tol=2e-5)
    logged = [t._metrics["train"] for t in trainers]
    assert logged[0]["aux_loss"][0] > 0
    for name in ("aux_loss", "policy_loss"):
        assert logged[1][name] == pytest.approx(logged[0][name], rel=1e-5), name


def test_trl_readme_snippet_and_refusals(trl_env):
    """The README's TRL snippet (irt_loss_type="is_reshape" under dapo's normalizer) runs, equals
    grpo_policy_loss → irt.policy_loss, and TRL options the op cannot express are refused."""
    from isreshape_triton.integrations.trl import IRTGRPOTrainer, grpo_policy_loss

    trainer = make_trainer(trl_env, IRTGRPOTrainer, "dapo", irt_loss_type="is_reshape",
                           irt_params={"rho_min": 0.3})
    inputs = trl_inputs(trainer)
    loss, grads, launches = trl_step(trainer, inputs)
    assert launches > 0 and torch.isfinite(loss) and "irt/gamma" in trainer._metrics["train"]
    lp = torch.randn(2, 3, requires_grad=True)
    old, mask = lp.detach() + 0.1, torch.ones(2, 3)
    got = grpo_policy_loss(lp, old, torch.tensor([[1.0], [-1.0]]), mask, loss_type="dapo", family="is_reshape",
                           num_items_in_batch=torch.tensor(6.0))[0]
    want = irt.reference.policy_loss(lp, old, torch.tensor([1.0, -1.0]), mask, "is_reshape", "token-mean")[0]
    close(got, want)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_policy_loss(lp, old, torch.ones(2), mask, loss_type="vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="one advantage per sequence"):
        grpo_policy_loss(lp, old, torch.ones(2, 3), mask, loss_type="grpo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="use_bias_correction_kl"):  # TRL weighs the KL by the sequence ratio
        make_trainer(trl_env, IRTGRPOTrainer, "grpo", beta=0.1,
                     config={"use_bias_correction_kl": True, "importance_sampling_level": "sequence"})
    with pytest.raises(ValueError, match="top_entropy_quantile"):  # VESPO: rollout weights enter its row weight
        make_trainer(trl_env, IRTGRPOTrainer, "vespo", config={"top_entropy_quantile": 0.5})
    with pytest.raises(ValueError, match="off_policy_mask_threshold"):
        make_trainer(trl_env, IRTGRPOTrainer, "dapo", irt_loss_type="vespo", config={"off_policy_mask_threshold": 0.1})
    with pytest.raises(ValueError, match="policy_mask"):
        grpo_policy_loss(lp, old, torch.ones(2), mask, loss_type="vespo", num_items_in_batch=torch.tensor(6.0),
                         policy_mask=torch.ones(2, 1))


# ----------------------------------------------------------------------------- OpenRLHF
def load_openrlhf_loss():
    """The installed OpenRLHF's real ``openrlhf/models/loss.py`` (and its ``utils.py``, as the
    attribute ``utils``), without
    running ``openrlhf/models/__init__.py``: that imports the actor (peft, flash-attn,
    DeepSpeed), which has no CPU install. ``utils.py`` imports ``deepspeed`` at the top for a
    ZeRO-3 helper the loss never calls: a placeholder module stands in when it is absent."""
    spec = importlib.util.find_spec("openrlhf")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {k: sys.modules.get(k) for k in ("openrlhf", "openrlhf.models", "openrlhf.models.utils",
                                             "openrlhf.models.loss", "deepspeed")}
    try:
        for name, path in (("openrlhf", root), ("openrlhf.models", root / "models")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
        if importlib.util.find_spec("deepspeed") is None:
            sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        module = importlib.import_module("openrlhf.models.loss")
        return types.SimpleNamespace(**vars(module), utils=importlib.import_module("openrlhf.models.utils"))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def openrlhf_loss():
    module = load_openrlhf_loss()
    assert importlib.metadata.version("openrlhf") == "0.11.2"
    return module


OPENRLHF_CASES = [
    ({"token_level_loss": True}, {}),
    ({"token_level_loss": False}, {"dp_size": 2}),  # no global count: OpenRLHF ignores dp_size
    ({"token_level_loss": True, "dual_clip": 3.0, "clip_eps_high": 0.28}, {"dp_size": 2, "batch_num_tokens": 30.0}),
    ({"token_level_loss": False}, {}),
    ({"token_level_loss": False, "dual_clip": 2.5}, {"dp_size": 4, "global_batch_size": torch.tensor(7.0)}),
]
OPENRLHF_IS = [
    {"is_correction_level": "token", "is_correction_mode": "mask"},
    {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_threshold": (0.8, 1.2)},
    {"is_correction_level": "seq", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.05)},
    {"is_correction_level": "token", "is_correction_mode": "mask", "is_correction_threshold": (0.95, 1.05)},
    {"is_correction_level": "seq", "is_correction_mode": "mask", "is_correction_threshold": (0.97, 1.03)},
]


OPENRLHF_GSPO = [
    ({"policy_loss_type": "gspo", "clip_eps_low": 0.02, "clip_eps_high": 0.03}, {"dp_size": 2}),
    ({"policy_loss_type": "gspo", "clip_eps_low": 0.02, "clip_eps_high": 0.03, "is_correction_level": "token"},
     {"global_batch_size": torch.tensor(7.0)}),
    ({"policy_loss_type": "gspo", "clip_eps_low": 0.02, "clip_eps_high": 0.03, "dual_clip": 1.5}, {}),
]


@pytest.mark.parametrize("init, call", OPENRLHF_CASES + [
    ({"token_level_loss": i % 2 == 0, **c}, {}) for i, c in enumerate(OPENRLHF_IS)] + OPENRLHF_GSPO)
def test_openrlhf_policy_loss_contract(openrlhf_loss, init, call):
    """Our PolicyLoss == OpenRLHF's PolicyLoss: same constructor, same forward arguments, same
    5-tuple (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio), same gradient (GSPO: with
    GRPO's one advantage per sequence)."""
    from isreshape_triton.integrations.openrlhf import PolicyLoss

    lp, old, adv, mask, _, _ = batch(seed=21)
    adv[2, :3] = -2.0
    old[2, :3] = lp[2, :3].detach() - 1.5
    if init.get("policy_loss_type") == "gspo":
        adv = adv[:, :1].expand_as(adv).clone()
    mask[1, 0] = True  # OpenRLHF's seq-level correction divides by the row's count
    rollout = old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
    args = (old, adv, mask.float(), rollout)
    want = loss_and_grad(openrlhf_loss.PolicyLoss(**init), lp, *args, **call)
    with LaunchCounter() as launches:
        got = loss_and_grad(PolicyLoss(**init), lp, *args, **call)
    assert launches.launches > 0
    close(got[0], want[0])
    close(got[1], want[1])
    assert len(got[2]) == len(want[2]) == 5
    for a, b in zip(got[2][1:], want[2][1:]):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b)
    if init.get("is_correction_threshold") in ((0.95, 1.05), (0.97, 1.03)):
        assert 0 < want[2][4] < 1  # the correction filters some tokens / rows


def kl_part(kl_kwargs, lp, old, adv, mask, ref, loss_type="gpg"):
    """(value, gradient) of the op's KL term alone: the op with it minus the op without it."""
    with_kl = loss_and_grad(irt.policy_loss, lp, old, adv, mask, loss_type, "token-mean", ref_log_prob=ref,
                            **kl_kwargs)
    without = loss_and_grad(irt.policy_loss, lp, old, adv, mask, loss_type, "token-mean")
    return with_kl[0] - without[0], with_kl[1] - without[1]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_unbiased_gradient_kl(openrlhf_loss, estimator):
    """kl_correction="unbiased" == OpenRLHF's compute_approx_kl(unbiased_gradient=True): the
    estimator's value, the gradient min(w, 10)·x with w = π/π_old (w = e³ > 10 on some tokens)."""
    lp, old, adv, mask, _, ref = batch(seed=31)
    old[0, :3] = lp[0, :3].detach() - 3.0
    x = lp.detach().clone().requires_grad_()
    kl = openrlhf_loss.utils.compute_approx_kl(x, ref, log_probs_old=old, kl_estimator=estimator,
                                               unbiased_gradient=True)
    want = (kl * mask).sum() / mask.sum()
    want.backward()
    got = kl_part({"kl_coef": 1.0, "kl_type": estimator, "kl_correction": "unbiased"}, lp, old, adv, mask, ref)
    close(got[0], want.detach())
    close(got[1], x.grad)


def test_openrlhf_readme_snippet():
    """The README's OpenRLHF snippet: any family behind the same forward contract."""
    from isreshape_triton.integrations.openrlhf import PolicyLoss

    actor_loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, loss_type="is_reshape", rho_min=0.3)
    lp, old, adv, mask, _, _ = batch(seed=4)
    with LaunchCounter() as launches:
        loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = actor_loss_fn(lp, old, adv, action_mask=mask)
        loss.backward()
    assert launches.launches > 0 and math.isfinite(loss.item())
    assert clip_ratio.item() == 0.0 and vllm_kl is None and is_filter_ratio is None
    assert "gamma" in actor_loss_fn.metrics
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="cispo")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        PolicyLoss(policy_loss_type="gspo", dual_clip=1.0)  # OpenRLHF: dual_clip > 1
