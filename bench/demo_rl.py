"""End-to-end off-policy RL demo: a tiny transformer learns to sort digits from a
verifiable reward, trained on rollouts of a policy k updates stale.

    python -m bench.demo_rl                 # default grid, < 10 min on 2 CPU cores
    python -m bench.demo_rl --full          # 5 seeds, 600 steps
    python -m bench.demo_rl --device cuda   # the fused Triton op on a GPU

Task: a prompt of L random digits and a separator; the completion should be the
digits sorted. Reward of a completion: the fraction of its L positions that hold the
right digit (exact, verifiable). Policy: a 2-layer causal transformer in plain torch,
randomly initialised. Each step samples G completions for each of B prompts from the
*behaviour* policy, the learner k updates ago (k = 0: on-policy), takes group-centred
rewards as advantages and makes one Adam step on ``irt.policy_loss(log π_θ, log μ, A)``
of the family (token-mean). Every ``eval_every`` steps the current policy decodes a
fixed set of prompts greedily; its mean reward is the curve. Families: ppo_clip,
is_reshape (γ from ESS), is_reshape_sign, is_reshape_tr, sapo, vespo.

Outputs (``--out``, default bench/out, untracked; ``--out bench/results`` rewrites the
committed figures): demo_rl_reward.png (reward vs step, mean ±
std over seeds, one panel per k), demo_rl_gamma_ess.png (γ and ESS/n per step),
demo_rl.md (final reward ± std), demo_rl.json (every trace).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import isreshape_triton as irt

FAMILIES = ("ppo_clip", "is_reshape", "is_reshape_sign", "is_reshape_tr", "sapo", "vespo")
COLORS = dict(zip(FAMILIES, ("C0", "C1", "C2", "C3", "C4", "C5")))
GAMMA_METRIC = {"is_reshape": "gamma", "is_reshape_sign": "gamma_mean", "is_reshape_tr": "gamma_mean"}


class Block(torch.nn.Module):
    """Pre-norm causal self-attention + MLP."""

    def __init__(self, d_model, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        self.qkv, self.proj = torch.nn.Linear(d_model, 3 * d_model), torch.nn.Linear(d_model, d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class Policy(torch.nn.Module):
    """2-layer causal transformer over digits 0..D-1 and a separator token D."""

    def __init__(self, vocab: int, max_len: int, d_model=32, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(max_len, d_model))
        self.blocks = torch.nn.Sequential(*[Block(d_model, heads) for _ in range(layers)])
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(d_model), torch.nn.Linear(d_model, vocab))

    def forward(self, tokens):
        return self.head(self.blocks(self.embed(tokens) + self.pos[:tokens.shape[1]]))


class Task:
    """Sort L digits in [0, D); reward = fraction of positions right."""

    def __init__(self, digits=6, length=5):
        self.D, self.L = digits, length
        self.vocab, self.max_len = digits + 1, 2 * length + 1

    def prompts(self, n, generator, device):
        x = torch.randint(0, self.D, (n, self.L), generator=generator).to(device)
        return torch.cat([x, torch.full((n, 1), self.D, device=device)], 1)

    def reward(self, prompts, completions):
        return (completions == prompts[:, :self.L].sort(1).values).float().mean(1)


@torch.no_grad()
def sample(policy, prompts, L, greedy=False, generator=None):
    """Completions [N, L] and their log-probs under ``policy`` [N, L]."""
    tokens, logps = prompts, []
    for _ in range(L):
        logits = policy(tokens)[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).squeeze(1).to(logits.device)
        logps.append(logits.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1))
        tokens = torch.cat([tokens, nxt[:, None]], 1)
    return tokens[:, prompts.shape[1]:], torch.stack(logps, 1)


def completion_logp(policy, prompts, completions):
    tokens = torch.cat([prompts, completions], 1)
    logits = policy(tokens[:, :-1])[:, prompts.shape[1] - 1:].float()
    return logits.log_softmax(-1).gather(2, completions[..., None]).squeeze(2)


def train_run(family, k, seed, cfg, task, device):
    """One training run; returns the eval-reward trace and the γ / ESS traces."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    policy = Policy(task.vocab, task.max_len).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    behaviour = copy.deepcopy(policy)
    snapshots = collections.deque([copy.deepcopy(policy.state_dict())], maxlen=k + 1)
    eval_prompts = task.prompts(128, torch.Generator().manual_seed(123), device)
    trace = {"step": [], "reward": [], "gamma": [], "ess_ratio": [], "train_reward": []}
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0:
            policy.eval()
            greedy, _ = sample(policy, eval_prompts, task.L, greedy=True)
            trace["step"].append(step)
            trace["reward"].append(task.reward(eval_prompts, greedy).mean().item())
            policy.train()
        if step == cfg.steps:
            break
        behaviour.load_state_dict(snapshots[0])  # the learner k updates ago
        prompts = task.prompts(cfg.prompts, gen, device).repeat_interleave(cfg.group, 0)
        completions, old_logp = sample(behaviour, prompts, task.L, generator=gen)
        r = task.reward(prompts, completions)
        adv = r - r.view(-1, cfg.group).mean(1).repeat_interleave(cfg.group)
        logp = completion_logp(policy, prompts, completions)
        loss, metrics = irt.policy_loss(logp, old_logp, adv, None, family, "token-mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        snapshots.append(copy.deepcopy(policy.state_dict()))
        trace["train_reward"].append(r.mean().item())
        trace["gamma"].append(metrics[GAMMA_METRIC[family]].item() if family in GAMMA_METRIC else math.nan)
        trace["ess_ratio"].append(metrics["ess_ratio"].item())
    return trace


def mean_std(rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t.mean(0), (t.std(0, unbiased=True) if t.shape[0] > 1 else torch.zeros(t.shape[1:], dtype=t.dtype))


def plot(results, cfg, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = cfg.staleness
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for fam in cfg.families:
            runs = results[fam][str(k)]
            m, s = mean_std([r["reward"] for r in runs])
            steps = runs[0]["step"]
            ax.plot(steps, m, label=fam, color=COLORS[fam])
            ax.fill_between(steps, m - s, m + s, alpha=0.15, color=COLORS[fam])
        ax.set_title(f"rollouts {k} updates stale")
        ax.set_xlabel("update step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"greedy reward (mean ± std, {len(cfg.seeds)} seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Sorting digits from scratch: reward vs step")
    fig.tight_layout()
    fig.savefig(out / "demo_rl_reward.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(ks), figsize=(5 * len(ks), 6.5), sharex=True, squeeze=False)
    for j, k in enumerate(ks):
        for fam in cfg.families:
            runs = results[fam][str(k)]
            if fam in GAMMA_METRIC:
                axes[0][j].plot(mean_std([r["gamma"] for r in runs])[0], label=fam, lw=1, color=COLORS[fam])
            axes[1][j].plot(mean_std([r["ess_ratio"] for r in runs])[0], label=fam, lw=1, color=COLORS[fam])
        axes[0][j].set_title(f"k = {k}")
        axes[1][j].set_xlabel("update step")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("γ: batch γ (is_reshape), token mean\nof γ+/γ− (sign) or γ_t (tr)")
    axes[1][0].set_ylabel("ESS / n at the family's exponent")
    axes[0][-1].legend(fontsize=8)
    axes[1][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "demo_rl_gamma_ess.png", dpi=110)
    plt.close(fig)


def table(results, cfg, seconds) -> str:
    tail = max(1, len(next(iter(next(iter(results.values())).values()))[0]["reward"]) // 5)
    lines = [f"Final greedy reward (mean of the last {tail} evaluations, mean ± std over seeds "
             f"{list(cfg.seeds)}); chance = {1 / cfg.digits:.3f}.", "",
             "| family | " + " | ".join(f"k = {k}" for k in cfg.staleness) + " |",
             "|---|" + "---|" * len(cfg.staleness)]
    for fam in cfg.families:
        cells = []
        for k in cfg.staleness:
            finals = [sum(r["reward"][-tail:]) / tail for r in results[fam][str(k)]]
            m, s = mean_std([[f] for f in finals])
            cells.append(f"{m.item():.3f} ± {s.item():.3f}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += ["", f"Setup: sort {cfg.length} digits of {cfg.digits}; {cfg.prompts} prompts × {cfg.group} samples "
              f"per step, {cfg.steps} Adam steps (lr {cfg.lr}), token-mean, default family parameters; "
              f"{seconds:.0f} s on {cfg.device_name}."]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="5 seeds, 600 steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int)
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 4, 16])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--digits", type=int, default=6)
    p.add_argument("--length", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                   help="output folder (default: bench/out, untracked); --out bench/results rewrites the committed figures")
    cfg = p.parse_args(argv)
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: error: --device {cfg.device}: no CUDA device is visible to torch "
                  "(torch.cuda.is_available() is False); use --device cpu\n")
    cfg.steps = cfg.steps or (600 if cfg.full else 150)
    cfg.seeds = range(cfg.seeds or (5 if cfg.full else 2))
    return cfg


def main(argv=None):
    cfg = parse(argv)
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared 2-core machine
    device = torch.device(cfg.device)
    cfg.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    task = Task(cfg.digits, cfg.length)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = {}, time.time()
    for fam in cfg.families:
        results[fam] = {}
        for k in cfg.staleness:
            runs = []
            for seed in cfg.seeds:
                runs.append(train_run(fam, k, seed, cfg, task, device))
                print(f"{fam:16s} k={k:2d} seed={seed} final={runs[-1]['reward'][-1]:.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
            results[fam][str(k)] = runs
    seconds = time.time() - t0
    plot(results, cfg, out)
    md = table(results, cfg, seconds)
    (out / "demo_rl.md").write_text(md)
    (out / "demo_rl.json").write_text(json.dumps(
        {"config": {k: (list(v) if isinstance(v, range) else v) for k, v in vars(cfg).items()},
         "seconds": seconds, "results": results}))
    print(md)


if __name__ == "__main__":
    main()
