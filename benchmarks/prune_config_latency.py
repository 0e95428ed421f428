"""onnxruntime latency of one model pruned 50 % under several ``channel_prune`` settings, side by side.

For each model: the dense compact ONNX and one shrunk compact ONNX per setting are timed in interleaved
rounds in one process (onnxruntime, 1 thread, the thread's CPU clock, as ``torchvision_sweep.py``), so
the ratios between settings are measured together. Shows what ``round_to`` (channel counts that fill
the SIMD blocks of onnxruntime's NCHWc kernels: 16 floats on AVX-512) and ``conv_groups`` (whole conv
groups instead of channels inside every group) do to real latency and to MACs.

    python benchmarks/prune_config_latency.py --out benchmarks/results/prune_config_latency.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import harness  # noqa: E402
from benchmarks import prune_sweep_worker as W  # noqa: E402

MODELS = (
    "regnet_x_400mf",
    "regnet_y_800mf",
    "regnet_x_1_6gf",
    "regnet_y_3_2gf",
    "regnet_x_8gf",
    "regnet_y_16gf",
    "resnext50_32x4d",
    "resnext101_64x4d",
    "mobilenet_v2",
    "efficientnet_b0",
    "resnet50",
)
CONFIGS = ("round_to=1", "round_to=16", "round_to=1,conv_groups=prune", "round_to=16,conv_groups=prune")


def parse_config(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key] = int(value) if value.isdigit() else value
    return out


def measure(name: str, configs: list[str], budget_s: float) -> list[dict]:
    model, inputs = W.build(W.spec(name))
    _, macs_before = W.count(model, inputs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx"}
        W.compact_onnx(W.sparsifx_trace(model), inputs, paths["dense"], verify=False)
        for i, text in enumerate(configs):
            shrunk = W.pruned_copy(model, inputs, {"ratio": 0.5, **parse_config(text)})
            _, macs = W.count(shrunk, inputs)
            paths[text] = Path(tmp) / f"c{i}.onnx"
            W.compact_onnx(shrunk, inputs, paths[text])  # verified against torch
            rows.append({"model": name, "config": text, "macs_ratio": macs / macs_before})
        ms = W.ort_ms(paths, inputs, budget_s, min_rounds=9)
    for row in rows:
        row["ort_latency_ratio"] = ms[row["config"]] / ms["dense"]
        row["ort_latency_over_macs"] = row["ort_latency_ratio"] / row["macs_ratio"]
    return rows


def sides_text(names: list[str]) -> str:
    """'224 px; 128: vit_b_16, vit_l_16': the most common side, then the models with other sides."""
    by_side: dict[int, list[str]] = {}
    for n in names:
        by_side.setdefault(W.spec(n).side, []).append(n)
    common = max(by_side, key=lambda side: len(by_side[side]))
    return "; ".join([f"{common} px"] + [f"{side}: {', '.join(ns)}" for side, ns in by_side.items() if side != common])


def summary_lines(rows: list[dict], configs: list[str]) -> list[str]:
    lines = []
    for c in configs:
        over = [r["ort_latency_over_macs"] for r in rows if r["config"] == c]
        lat = [r["ort_latency_ratio"] for r in rows if r["config"] == c]
        lines.append(
            f"- `{c}`: median latency ratio {statistics.median(lat):.3f}, median latency/MACs "
            f"{statistics.median(over):.3f}, {sum(v <= 1.1 for v in over)}/{len(over)} models at most 1.1"
        )
    return lines


def markdown(rows: list[dict], configs: list[str], meta: dict) -> str:
    lines = [
        "# onnxruntime latency by channel_prune setting (ratio 0.5)",
        "",
        f"{meta['note']}",
        "",
        harness.load_line(meta),
        "",
        "Each cell: onnxruntime latency ratio (shrunk / dense) · MACs ratio · latency ratio over MACs ratio.",
        "",
        *summary_lines(rows, configs),
        "",
        "| model | " + " | ".join(f"`{c}`" for c in configs) + " |",
        "|---|" + "---|" * len(configs),
    ]
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["config"]] = r
    for model, cells in by_model.items():
        best = min(cells.values(), key=lambda r: r["ort_latency_ratio"])["config"]
        text = []
        for c in configs:
            r = cells[c]
            cell = f"{r['ort_latency_ratio']:.3f} · {r['macs_ratio']:.3f} · {r['ort_latency_over_macs']:.2f}"
            text.append(f"**{cell}**" if c == best else cell)
        lines.append(f"| {model} | " + " | ".join(text) + " |")
    lines += ["", "Bold: the lowest latency of the row.", "", "```", meta["command"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), help="channel_prune settings, e.g. round_to=16,conv_groups=prune"
    )
    ap.add_argument("--budget-s", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_config_latency.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    machine = harness.machine(threads=1, clock="cpu")
    rows = []
    for name in args.models.split(","):
        for row in measure(name, args.configs, args.budget_s):
            rows.append(row)
            print(
                f"{row['model']:18s} {row['config']:30s} ort {row['ort_latency_ratio']:.3f} "
                f"MACs {row['macs_ratio']:.3f} over {row['ort_latency_over_macs']:.2f}",
                flush=True,
            )
    meta = {
        **harness.finish(machine),
        "command": "python benchmarks/prune_config_latency.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        ),
        "note": f"Input side as in the sweep ({sides_text(args.models.split(','))}), batch 1; onnxruntime "
        f"1 thread, CPU clock, median of interleaved rounds; {machine['machine']}, "
        f"torch {torch.__version__}.",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    harness.write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, args.configs, meta))


if __name__ == "__main__":
    main()
