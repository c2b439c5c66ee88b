"""``python -m bench.from_logits``: the from-logits op beside eager PyTorch (and Liger on a GPU).

One forward + backward step per row, with an entropy bonus in the loss, at V = 32K and
152K (Qwen's 152064):

* ``eager``: logits.float()/T → log_softmax → gather → the eager loss of bench/eager.py
  (verl's style), entropy from the full softmax, autograd backward;
* ``fused``: ``irt.policy_loss_from_logits`` (Triton; on a CPU in the interpreter, with
  ``TRITON_INTERPRET=1``), out of place and with ``inplace_backward=True``;
* ``liger``: Liger-Kernel's ``triton_grpo_loss`` (ppo_clip only, no entropy; GPU only).

Figures: Triton and aten launches, host syncs, bytes (eager: counted aten bytes; fused:
the analytic ``from_logits.traffic_model`` plus the log-prob op's ``launch.traffic_model`` plus
counted aten glue), that in units of the logits' size, peak extra memory (storages
created inside the step, the returned gradient excluded) and wall time: CPU wall time is
labelled as such (the interpreter runs Triton programs in NumPy: not a speed figure); on
a GPU ``triton.testing.do_bench``. Writes bench/results/from_logits.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from . import use_interpreter


def _setup(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        use_interpreter()
    return device


def _batch(N: int, V: int, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    B, T = 2, N // 2
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T // 2:] = False
    labels[~mask] = -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    old = lp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    return [t.to(device) for t in (logits, labels, old, adv, mask)]


def _eager_step(family, temperature, beta):
    import torch

    from .eager import EAGER

    def step(logits, labels, old, adv, mask):
        z = logits.float() / temperature
        log_p = torch.log_softmax(z, -1)
        lp = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        loss, _ = EAGER[family](lp, old, adv, mask, "token-mean")
        m = mask.float()
        return loss - beta * (entropy * m).sum() / m.sum()
    return step


def _fused_step(family, temperature, beta, inplace):
    import isreshape_triton as irt

    def step(logits, labels, old, adv, mask):
        loss, _, entropy = irt.policy_loss_from_logits(logits, labels, old, adv, mask, family,
                                                       temperature=temperature, return_entropy=True,
                                                       inplace_backward=inplace)
        m = mask.float()
        return loss - beta * (entropy * m).sum() / m.sum()
    return step


def _liger_step(temperature):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def step(logits, labels, old, adv, mask):
        full = logits  # Liger drops the last position: give it [B, T+1, V]
        loss, _ = triton_grpo_loss(full, old, None, labels, adv[:, 0].contiguous(), mask.float(),
                                   temperature=temperature, beta=0.0, inplace=True, loss_type="bnpo")
        return loss
    return step


def _fused_bytes(family, N, V, dtype, mask_dtype):
    import torch

    from isreshape_triton import from_logits, launch

    lp_op = launch.traffic_model(family, torch.float32, mask_dtype, 2, N // 2, "BT")
    return from_logits.traffic_model(N, V, dtype, entropy_grad=True) + lp_op


def measure(impl, family, N, V, dtype, device, temperature=0.8, beta=0.01) -> dict:
    import torch

    from isreshape_triton.dev.profiling import count_work

    logits, labels, old, adv, mask = _batch(N, V, dtype, device)
    if impl == "liger":
        logits = torch.cat([logits, logits[:, :1]], dim=1)  # the [B, T+1, V] layout Liger reads
    step = {"eager": lambda: _eager_step(family, temperature, beta),
            "fused": lambda: _fused_step(family, temperature, beta, False),
            "fused_inplace": lambda: _fused_step(family, temperature, beta, True),
            "liger": lambda: _liger_step(temperature)}[impl]()
    logits_bytes = logits.numel() * logits.element_size()
    row = {"impl": impl, "family": family, "dtype": str(dtype).replace("torch.", ""), "N": N, "V": V,
           "logits_bytes": logits_bytes}
    x = logits.clone().requires_grad_()
    t0 = time.perf_counter()
    with count_work() as work:
        step(x, labels, old, adv, mask).backward()
    wall = time.perf_counter() - t0
    grad_bytes = 0 if impl in ("fused_inplace", "liger") else logits_bytes
    row.update(triton_launches=work.triton_launches, torch_launches=work.torch_launches, syncs=work.syncs,
               aten_bytes=work.bytes, peak_extra_bytes=work.peak_bytes - grad_bytes,
               kernels=sorted(set(work.kernels)))
    if impl.startswith("fused"):
        row["bytes"] = _fused_bytes(family, N, V, dtype, mask.dtype) + work.bytes
    elif impl == "eager":
        row["bytes"] = work.bytes
    if row.get("bytes"):
        row["logits_passes"] = round(row["bytes"] / logits_bytes, 2)
    if device == "cuda":
        import triton.testing

        def once():
            y = logits.clone().requires_grad_()
            step(y, labels, old, adv, mask).backward()
        row["gpu_ms"] = triton.testing.do_bench(once)
    else:
        row["cpu_wall_s"] = round(wall, 3)
    return row


def render(rows, device) -> str:
    timing = "GPU fwd+bwd ms (do_bench, incl. a logits clone)" if device == "cuda" else \
        "CPU wall s (fused: Triton interpreter, NumPy; not a speed figure)"
    head = ["impl", "family", "dtype", "N", "V", "launches (Triton + aten)", "syncs", "bytes",
            "× logits", "peak extra (KB)", timing]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.get("gpu_ms", r.get("cpu_wall_s"))
        b = r.get("bytes")
        lines.append("| " + " | ".join(str(v) for v in (
            r["impl"], r["family"], r["dtype"], r["N"], r["V"],
            f"{r['triton_launches']} + {r['torch_launches']}", r["syncs"],
            f"{b / 1e6:.1f} MB" if b else "—", r.get("logits_passes", "—"),
            f"{r['peak_extra_bytes'] / 1e3:.1f}", f"{t:.3f}" if t is not None else "—")) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.from_logits", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--tokens", type=int, default=None, help="N (default: 8 on a CPU, 4096 on a GPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    device = _setup(args.device)
    import torch

    N = args.tokens or (4096 if device == "cuda" else 8)
    impls = ["eager", "fused", "fused_inplace"] + (["liger"] if device == "cuda" else [])
    rows = []
    for V in (32768, 152064):
        for family in ("is_reshape", "ppo_clip"):
            for impl in impls:
                if impl == "liger" and family != "ppo_clip":
                    continue
                try:
                    rows.append(measure(impl, family, N, V, torch.bfloat16, device))
                except ImportError as e:  # liger-kernel not installed
                    rows.append({"impl": impl, "family": family, "error": repr(e)})
    ok = [r for r in rows if "error" not in r]
    text = (f"### From logits: one fwd+bwd step with an entropy bonus ({device}, bf16 logits, N = {N})\n\n"
            + render(ok, device) + "\n\nbytes: eager = counted aten bytes; fused = analytic traffic model of the "
            "logits kernels + the log-prob op + counted aten glue. peak extra: storages created in the step, "
            "the returned gradient excluded (in place: it is the logits' storage).\n")
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "from_logits.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "from_logits.json"), "w") as fh:
        json.dump({"device": device, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
