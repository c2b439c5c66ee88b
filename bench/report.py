"""Markdown tables, the JSON file and the PNG plot of a benchmark run."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from .runner import H100_BW, LAUNCH_S, h100_model_us

IMPL_ORDER = ["eager", "reference", "fused", "compiled"]
IMPL_LABEL = {"eager": "eager (trainer-style)", "reference": "irt.reference", "fused": "fused (irt.policy_loss)",
              "compiled": "torch.compile(reference)"}
MODEL_POSITIONS = 1024 * 4096
# SPEC §13 budget for the fused op, fp32 with a float mask: forward ≤ 2 Triton launches (≤ 1
# without batch statistics) + backward 1, no other kernel but the completion ticket's one-time
# allocation on a device's first call, 0 syncs, ≤ 44 B/token
ACCEPT = {"syncs": 0, "triton_launches": 3, "torch_launches": 1, "bytes_per_token": 44.0}


def _fmt(x, nd=1):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -nd):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def summary_rows(rows: List[dict]) -> List[dict]:
    """Per (family, dtype, impl): the ok row at the largest size (else the last status row)."""
    best: Dict[tuple, dict] = {}
    for r in rows:
        key = (r["family"], r["dtype"], r["impl"])
        cur = best.get(key)
        ok, cur_ok = r.get("status") == "ok", cur is not None and cur.get("status") == "ok"
        if cur is None or (ok and (not cur_ok or r["positions"] >= cur["positions"])) or (not ok and not cur_ok):
            best[key] = r
    order = {n: i for i, n in enumerate(IMPL_ORDER)}
    fams = list(dict.fromkeys(r["family"] for r in rows))
    dtypes = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
    return sorted(best.values(), key=lambda r: (fams.index(r["family"]), dtypes.get(r["dtype"], 9),
                                                order[r["impl"]]))


def _launch_cell(r):
    if r.get("launches") is None:
        return "n/a"
    if r.get("torch_launches") is None:
        return f"{r['launches']} ({r.get('launches_source', 'Triton')})"
    return f"{r['launches']} = {r['triton_launches']} Triton + {r['torch_launches']} aten"


def _diff_cell(r):
    d = r.get("rel_diff_vs_reference")
    return "—" if d is None else f"{max(d['loss'], d['grad']):.1e}"


def counts_table(rows: List[dict]) -> str:
    head = ("| family | dtype | implementation | counted at B×T | launches | host syncs | bytes / token "
            "| peak extra bytes / token | H100 *model* µs @1024×4096 | max rel. diff vs reference |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in summary_rows(rows):
        size = f"{r['B']}×{r['T']}"
        if r.get("status") != "ok":
            lines.append(f"| {r['family']} | {r['dtype']} | {IMPL_LABEL[r['impl']]} | {size} "
                         f"| {r['status']} | | | | | |")
            continue
        model = h100_model_us(r, MODEL_POSITIONS)
        bpt = _fmt(r.get("bytes_per_token"))
        if r["impl"] == "fused" and r.get("bytes_per_token") is not None:
            bpt += " (model)"
        lines.append(f"| {r['family']} | {r['dtype']} | {IMPL_LABEL[r['impl']]} | {size} | {_launch_cell(r)} "
                     f"| {_fmt(r.get('syncs'))} | {bpt} | {_fmt(r.get('peak_bytes_per_token'))} "
                     f"| {_fmt(model)} | {_diff_cell(r)} |")
    return head + "\n".join(lines) + "\n"


def gpu_table(rows: List[dict], copy_bw: Optional[float]) -> str:
    head = ("| family | dtype | B×T | implementation | median fwd+bwd ms | achieved GB/s | % of D2D copy "
            "| CUDA kernels (profiler) | CUDA syncs (sync-debug) | CUDA peak extra MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r.get("status") != "ok" or r.get("gpu_median_ms") is None:
            continue
        bw = r.get("achieved_GBps")
        pct = None if bw is None or not copy_bw else 100 * bw / copy_bw
        peak = r.get("cuda_peak_extra_bytes")
        lines.append(f"| {r['family']} | {r['dtype']} | {r['B']}×{r['T']} | {IMPL_LABEL[r['impl']]} "
                     f"| {r['gpu_median_ms']:.4f} | {_fmt(bw)} | {_fmt(pct)} | {_fmt(r.get('cuda_kernels'))} "
                     f"| {_fmt(r.get('cuda_syncs'))} | {_fmt(None if peak is None else peak / 2**20, 2)} |")
    return head + "\n".join(lines) + "\n"


def acceptance(rows: List[dict]) -> List[dict]:
    """SPEC §13 acceptance per family: fused fp32 has 0 syncs, ≤ 3 Triton launches forward +
    backward and no other kernel (≤ 1: the ticket's one-time allocation), ≤ 44 bytes/token."""
    out = []
    summ = {(r["family"], r["dtype"], r["impl"]): r for r in summary_rows(rows)}
    for fam in dict.fromkeys(r["family"] for r in rows):
        f = summ.get((fam, "float32", "fused"))
        e = summ.get((fam, "float32", "eager"))
        item = {"family": fam, "fused": None, "eager": None}
        if e is not None and e.get("status") == "ok":
            item["eager"] = {k: e.get(k) for k in ("launches", "syncs", "bytes_per_token")}
        if f is None or f.get("status") != "ok":
            item["verdict"] = "n/a (" + ("not run" if f is None else f["status"]) + ")"
        else:
            item["fused"] = {k: f.get(k) for k in ("launches", "triton_launches", "torch_launches", "syncs",
                                                   "bytes_per_token", "stream_bytes_per_token")}
            checks = [f["syncs"] == 0, f["triton_launches"] <= ACCEPT["triton_launches"],
                      f["torch_launches"] <= ACCEPT["torch_launches"]]
            bpt = f.get("bytes_per_token")
            if bpt is None:
                item["verdict"] = ("FAIL" if not all(checks) else "PENDING") + " (bytes/token n/a: no traffic_model)"
            else:
                checks.append(f.get("stream_bytes_per_token", bpt) <= ACCEPT["bytes_per_token"])
                item["verdict"] = "PASS" if all(checks) else "FAIL"
        out.append(item)
    return out


def acceptance_text(items: List[dict]) -> str:
    lines = ["| family | verdict | fused: launches (Triton + torch) / syncs / bytes per token "
             "| eager: launches / syncs / bytes per token |",
             "|---|---|---|---|"]
    for it in items:
        def cell(d):
            if d is None:
                return "n/a"
            launches = (f"{d['triton_launches']} + {d['torch_launches']}" if "triton_launches" in d
                        else str(d["launches"]))
            stream = d.get("stream_bytes_per_token")
            per_token = _fmt(d["bytes_per_token"]) + ("" if stream is None else f" ({_fmt(stream)} streamed)")
            return f"{launches} / {d['syncs']} / {per_token}"
        lines.append(f"| {it['family']} | {it['verdict']} | {cell(it['fused'])} | {cell(it['eager'])} |")
    return "\n".join(lines) + "\n"


def aot_report(regenerate: bool = False) -> Optional[object]:
    """The sm_90 compile report of ``python -m isreshape_triton.dev.aot`` (committed in
    bench/results/aot_report.json; ``regenerate`` compiles every specialization again)."""
    from isreshape_triton.dev import aot

    path = str(aot.REPORT_PATH)
    if not regenerate and not os.path.exists(path):
        return {"error": "no bench/results/aot_report.json: run `python -m bench --aot` "
                         "(or `python -m isreshape_triton.dev.aot`) to compile every specialization"}
    if regenerate:
        try:
            aot.write_report(path)
        except Exception as e:  # noqa: BLE001 - reported in the output, the counts still stand
            return {"error": f"AOT compilation failed: {type(e).__name__}: {e}"}
    with open(path) as fh:
        return json.load(fh)


def aot_text(report) -> str:
    """Per kernel: specializations compiled for sm_90, registers, shared memory, spills."""
    rows = report.get("kernels") if isinstance(report, dict) else None
    if not rows:
        return f"```\n{json.dumps(report)[:2000]}\n```\n"
    lines = [f"Target: {report.get('target', 'sm_90')}; every specialization below compiled ahead of time "
             "(`python -m isreshape_triton.dev.aot`).\n",
             "| kernel | specializations | compile errors | registers (min–max) | shared memory bytes (max) "
             "| spill stores / loads (total) |", "|---|---|---|---|---|---|"]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        ks = [r for r in rows if r["kernel"] == kernel]
        ok = [r for r in ks if "error" not in r]
        regs = [r["registers"] for r in ok] or [0]
        lines.append(f"| {kernel} | {len(ks)} | {len(ks) - len(ok)} | {min(regs)}–{max(regs)} "
                     f"| {max((r['shared_bytes'] for r in ok), default=0)} "
                     f"| {sum(r['spill_stores'] for r in ok)} / {sum(r['spill_loads'] for r in ok)} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: str, gpu: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = [r for r in summary_rows(rows) if r["dtype"] == "float32" and r.get("status") == "ok"]
    fams = list(dict.fromkeys(r["family"] for r in rows))
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in summ)]
    panels = [("bytes_per_token", "tensor-level bytes / token (fp32, log)", True),
              ("launches", "kernel launches per fwd+bwd (fp32, log)", True),
              ("syncs", "host-device syncs per fwd+bwd (fp32)", False)]
    if gpu:
        panels.append(("gpu_median_ms", "GPU median fwd+bwd ms (largest size)", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.6))
    width = 0.8 / max(len(impls), 1)
    colors = {"eager": "#d62728", "reference": "#7f7f7f", "fused": "#2ca02c", "compiled": "#1f77b4"}
    for ax, (key, title, log) in zip(axes, panels):
        for k, impl in enumerate(impls):
            vals = []
            for fam in fams:
                r = next((x for x in summ if x["family"] == fam and x["impl"] == impl), None)
                vals.append(float("nan") if r is None or r.get(key) is None else r[key])
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(fams))]
            ax.bar(xs, vals, width, label=IMPL_LABEL[impl], color=colors[impl])
        if key == "bytes_per_token":
            ax.axhline(ACCEPT["bytes_per_token"], ls="--", c="k", lw=0.8, label="44 B/token budget")
        if key == "launches":
            ax.axhline(ACCEPT["triton_launches"] + ACCEPT["torch_launches"], ls="--", c="k", lw=0.8,
                       label="fused budget: 3 Triton + 4 torch")
        ax.set_xticks(range(len(fams)))
        ax.set_xticklabels(fams, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("isreshape-triton vs eager PyTorch — counts are measured, fused bytes from the traffic model",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(plan, env, rows, aot, wall_s) -> str:
    gpu = plan.device == "cuda"
    parts = [f"# isreshape-triton benchmark ({plan.mode} mode, {env.get('gpu') or 'CPU only'})\n"]
    parts.append("Figures are fwd+bwd of one `token-mean` policy loss on a synthetic batch (ragged masks, "
                 "realistic log-ratio spread). **Counts** (launches, syncs, bytes, peak memory) are measured "
                 "by `isreshape_triton.dev.profiling` and do not depend on the machine: every non-view aten op = "
                 "one launch, bytes = its tensor inputs + outputs; Triton launches are hooked. "
                 "Bytes / token are per B×T position. The **H100 model** column is an estimate, *not a "
                 f"measurement*: bytes / {H100_BW / 1e12:.2f} TB/s + launches × {LAUNCH_S * 1e6:.0f} µs, "
                 "scaled to 1024×4096 positions.\n")
    for note in plan.notes:
        parts.append(f"- {note}")
    parts.append("")
    parts.append("## Cost counts (machine-independent)\n")
    parts.append(counts_table(rows))
    parts.append("## Acceptance (fused, fp32, fwd+bwd: 0 syncs, ≤ 2 + 1 Triton launches, no other kernel, ≤ 44 streamed bytes/token)\n")
    parts.append(acceptance_text(acceptance(rows)))
    if gpu:
        parts.append(f"## GPU timings (measured, {env.get('gpu')}; D2D copy "
                     f"{env.get('copy_bandwidth_GBps', 0):.0f} GB/s)\n")
        parts.append(gpu_table(rows, env.get("copy_bandwidth_GBps")))
    else:
        parts.append("## GPU timings\n\nNot measured: no CUDA device on this machine.\n")
    parts.append("## sm_90 compile report (registers, spills per kernel)\n")
    parts.append(aot_text(aot) if aot is not None else
                 "Not available (no `isreshape_triton.dev.aot` report in bench/results/aot_report.json).\n")
    parts.append(f"Run took {wall_s:.0f} s on {env.get('cpu_count')} CPU cores.\n")
    return "\n".join(parts)


def write_json(path, plan, env, rows, aot, wall_s) -> None:
    payload = {"environment": env, "mode": plan.mode, "notes": plan.notes, "wall_s": wall_s,
               "sizes": plan.sizes, "fused_sizes": plan.fused_sizes,
               "model": {"h100_bandwidth_Bps": H100_BW, "launch_overhead_s": LAUNCH_S,
                         "note": "estimate, not a measurement"},
               "acceptance": acceptance(rows), "aot_report": aot, "runs": rows}
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)
    os.replace(tmp, path)
