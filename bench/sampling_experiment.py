"""The experiment of issue 11: does sampling rollouts from q* (seed 003) make learning faster than
sampling from the policy π_θ or from a better target π_t, with the IS-Reshape loss correcting for
the sampler?

Task (synthetic, tabular, exact evaluation): sequences of L = 5 tokens over V = 8; the reward is
the fraction of positions that match a hidden target sequence. The policy π_θ(y_t | y_{t−1}) is a
table of logits θ[t, y_{t−1}, :], initialised with a confidently wrong favourite token at every
position (π_θ(correct) ≈ 0.07). The target π_t is π_θ tilted by the true per-token reward:
logits_t = logits_θ + β·1[y = y*_t], β = 3 (it moves with θ). Each step draws B = 32 rollouts
token by token from the sampler — π_θ (α = 1), π_t (α = 0), q* by KL symmetry, q* by SNR —
and takes an Adam step on the ``is_reshape`` loss with old_log_prob = log q(y_t) (the sampler's
own probability, so w_t = π_θ/q corrects for it) and advantages R − mean(R). The curves are the
exact expected reward of π_θ, over seeds. On CPU the fp64 reference runs the sampler and the loss
(the kernels are checked against it in tests/test_sampling.py); on CUDA the kernels do.
"""
from __future__ import annotations

import json
import os

L, V, B, BETA, LR = 5, 8, 32, 3.0, 0.1
SAMPLERS = {"π_θ (on-policy)": 1.0, "π_t (target)": 0.0, "q* kl_symmetry": "kl_symmetry", "q* snr": "snr"}


def _expected_reward(theta, target):
    """Exact E_{π_θ}[reward]: forward recursion over the marginal of the previous token."""
    import torch

    prev = torch.zeros(V + 1, dtype=theta.dtype)
    prev[V] = 1.0
    total = 0.0
    for t in range(L):
        marg = prev @ torch.softmax(theta[t], dim=-1)
        total += float(marg[target[t]])
        prev = torch.cat([marg, marg.new_zeros(1)])
    return total / L


def _train(theta0, target, method, steps, seed, sample, policy_loss):
    import torch

    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=LR)
    gen = torch.Generator().manual_seed(1000 + seed)
    bonus = BETA * torch.nn.functional.one_hot(target, V).to(theta.dtype)
    rewards, alphas = [], []
    for step in range(steps + 1):
        rewards.append(_expected_reward(theta.detach(), target))
        if step == steps:
            break
        prev = torch.full((B,), V, dtype=torch.int64)
        tokens, log_q, alpha = [], [], []
        with torch.no_grad():
            for t in range(L):
                logits = theta[t, prev]
                r = sample(logits, logits + bonus[t], method=method, generator=gen)
                tokens.append(r.tokens)
                log_q.append(r.log_q)
                alpha.append(r.alpha)
                prev = r.tokens
        y = torch.stack(tokens, 1)
        prevs = torch.cat([torch.full((B, 1), V, dtype=torch.int64), y[:, :-1]], 1)
        logp = torch.log_softmax(theta[torch.arange(L), prevs], -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        reward = (y == target).to(theta.dtype).mean(1)
        adv = (reward - reward.mean()).unsqueeze(1).expand(B, L)
        loss, _ = policy_loss(logp, torch.stack(log_q, 1).to(logp.dtype), adv, None, loss_type="is_reshape")
        opt.zero_grad()
        loss.backward()
        opt.step()
        alphas.append(float(torch.stack(alpha).mean()))
    return rewards, alphas


def run_experiment(seeds: int, steps: int, out_dir: str) -> str:
    import torch

    import isreshape_triton as irt

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)  # the reference's ops are tiny: threads only add overhead
    sample = irt.optimal_sampling if cuda else irt.reference.optimal_sampling
    policy_loss = irt.policy_loss if cuda else irt.reference.policy_loss
    curves = {name: [] for name in SAMPLERS}
    alpha_traces = {name: [] for name in SAMPLERS}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        target = torch.randint(0, V, (L,), generator=g)
        theta0 = 0.5 * torch.randn(L, V + 1, V, generator=g, dtype=torch.float64)
        wrong = (target + 1 + torch.randint(0, V - 1, (L,), generator=g)) % V
        theta0[torch.arange(L), :, wrong] += 2.0
        for name, method in SAMPLERS.items():
            rewards, alphas = _train(theta0, target, method, steps, seed, sample, policy_loss)
            curves[name].append(rewards)
            alpha_traces[name].append(alphas)
    reward = {k: torch.tensor(v) for k, v in curves.items()}
    alpha = {k: torch.tensor(v) for k, v in alpha_traces.items()}
    marks = [m for m in (10, 25, 50, 100, steps) if m <= steps]
    lines = [f"`python -m bench.sampling --experiment --seeds {seeds} --steps {steps}` "
             f"({'CUDA kernels' if cuda else 'CPU, fp64 reference sampler and loss'}); expected reward of π_θ, "
             f"mean ± std over {seeds} seeds; start {float(reward[next(iter(reward))][:, 0].mean()):.3f}.\n",
             "| sampler | " + " | ".join(f"step {m}" for m in marks) + " | steps to 0.9 (median) | mean α |",
             "|---|" + "---|" * (len(marks) + 2)]
    for name, r in reward.items():
        hit = [(row >= 0.9).nonzero() for row in r]
        to90 = [int(h[0]) if len(h) else None for h in hit]
        reached = sorted(x for x in to90 if x is not None)
        med = f"{reached[len(reached) // 2]}" if len(reached) * 2 > len(to90) else f"> {steps}"
        cells = " | ".join(f"{float(r[:, m].mean()):.3f} ± {float(r[:, m].std()):.3f}" for m in marks)
        lines.append(f"| {name} | {cells} | {med} ({len(reached)}/{len(to90)} seeds) | "
                     f"{float(alpha[name].mean()):.3f} |")
    _plot(reward, alpha, os.path.join(out_dir, "sampling_experiment.png"))
    with open(os.path.join(out_dir, "sampling_experiment.json"), "w") as fh:
        json.dump({"reward": curves, "alpha": alpha_traces, "config": dict(L=L, V=V, B=B, beta=BETA, lr=LR)}, fh)
    text = "\n".join(lines) + "\n\n![reward vs step](sampling_experiment.png)\n"
    with open(os.path.join(out_dir, "sampling_experiment.md"), "w") as fh:
        fh.write(text)
    return text


def _plot(reward, alpha, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in reward.items():
        mean, std = r.mean(0), r.std(0)
        x = range(len(mean))
        ax.plot(x, mean, label=name)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("expected reward of π_θ")
    ax.legend()
    for name in ("q* kl_symmetry", "q* snr"):
        a = alpha[name]
        ax_a.plot(range(a.shape[1]), a.mean(0), label=name)
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("mean α (rows × positions)")
    ax_a.set_ylim(-0.05, 1.05)
    ax_a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
