"""Where onnxruntime's time goes when a model is pruned 50 %: per kernel kind, time ratio against MACs and bytes.

The sweep's ``ort lat/MACs`` column divides the latency ratio (shrunk / dense) by the MACs ratio. This script
explains that number per model. It profiles the dense and the shrunk compact ONNX (the sweep's export:
BatchNorm folded; the sweep's input side and ``round_to``) in onnxruntime, 1 thread, and sorts every executed
kernel into one of three kinds:

* ``gemm``: convolutions with one group, Gemm and MatMul. Pruning a fraction p of channels on both sides
  divides their MACs by about 1/(1-p)^2, 4x at 50 %.
* ``grouped``: grouped convolutions with more than one channel per group. Pruning inside every group
  divides their MACs 4x too, but leaves narrower groups (regnet_x_400mf: 16 -> 8 channels).
* ``per-channel``: everything else (depthwise convolutions, pooling, element-wise ops, concat, layout
  reorders). Their MACs and bytes fall with the channel count only, 2x at 50 %.

Per kind it prints the share of the dense model's kernel time, and the time, MACs and bytes ratios. Two
idealised latency/MACs figures for the same pruned shapes: ``bound`` keeps every gemm kernel at its dense
MACs per second, lets every other kernel fall by the smaller of its MACs and bytes ratios, and drops the
per-run overhead; ``roofline`` times every kernel as max(MACs / peak MAC rate, bytes / peak byte rate), the
peaks being the best rates any kernel of that model reached. Where they are near 1 and the measured
latency/MACs is not, the excess comes from kernels that run slower per MAC at the pruned widths, not from
the shapes. Whole-run latency is timed in steady state (``harness.interleaved_ms``).

    python benchmarks/ort_latency_breakdown.py --out benchmarks/results/ort_latency_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import harness  # noqa: E402
from benchmarks import prune_sweep_worker as W  # noqa: E402

MODELS = (
    "resnet50",
    "vgg11_bn",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "resnext50_32x4d",
    "regnet_x_400mf",
    "regnet_y_8gf",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "mnasnet1_0",
    "shufflenet_v2_x1_0",
    "densenet121",
    "googlenet",
    "squeezenet1_1",
)
GEMM_OPS = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"}
PROFILED_RUNS = 40


def _shapes(event: dict, key: str) -> list[list[int]]:
    return [next(iter(s.values())) for s in event["args"].get(key, [])]


def kernel_facts(event: dict) -> tuple[str, int, int]:
    """(kind, MACs, bytes) of one profiled kernel, from its input and output shapes."""
    op = event["args"]["op_name"]
    ins, outs = _shapes(event, "input_type_shape"), _shapes(event, "output_type_shape")
    size = (
        int(event["args"].get("activation_size", 0))
        + int(event["args"].get("output_size", 0))
        + int(event["args"].get("parameter_size", 0))
    )
    out_numel = math.prod(outs[0]) if outs else 0
    if op in ("Conv", "FusedConv") and len(ins) > 1:
        weight = ins[1]
        groups = ins[0][1] // weight[1] if weight[1] else 1
        kind = "gemm" if groups == 1 else ("per-channel" if weight[1] == 1 else "grouped")
        return kind, out_numel * math.prod(weight[1:]), size
    if op in GEMM_OPS and len(ins) > 1:
        return "gemm", out_numel * ins[0][-1], size
    return "per-channel", 0, size


def profile(path: Path, inputs: tuple) -> list[dict]:
    """Every kernel of one run: kind, MACs, bytes and median milliseconds."""
    session = harness.ort_session(path, 1, profile_prefix=str(path.with_suffix("")))
    feed = harness.ort_feed(session, inputs[:1])
    for _ in range(PROFILED_RUNS):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = defaultdict(list)
    facts: dict[str, tuple[str, int, int]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            durations[ev["name"]].append(ev["dur"] / 1e3)
            facts[ev["name"]] = kernel_facts(ev)
    # the first runs warm the arena and caches
    return [
        {"kind": facts[n][0], "macs": facts[n][1], "bytes": facts[n][2], "ms": statistics.median(ds[len(ds) // 4 :])}
        for n, ds in durations.items()
    ]


def roofline_ms(kernel: dict, macs_per_ms: float, bytes_per_ms: float) -> float:
    return max(kernel["macs"] / macs_per_ms, kernel["bytes"] / bytes_per_ms)


def by_kind(kernels: list[dict]) -> dict[str, dict]:
    kinds: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "macs": 0, "bytes": 0, "kernels": 0})
    for k in kernels:
        row = kinds[k["kind"]]
        for key in ("ms", "macs", "bytes"):
            row[key] += k[key]
        row["kernels"] += 1
    return dict(kinds)


def measure(name: str, round_to: int, budget_s: float) -> dict:
    spec = W.spec(name)
    model, inputs = W.build(spec)
    shrunk = W.pruned_copy(model, inputs, {"ratio": 0.5, "round_to": round_to})
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "shrunk": Path(tmp) / "shrunk.onnx"}
        W.compact_onnx(W.sparsifx_trace(model), inputs, paths["dense"], verify=False)
        W.compact_onnx(shrunk, inputs, paths["shrunk"])  # verified against torch
        total_ms = W.ort_ms(paths, inputs, budget_s, min_rounds=9)
        kernels = {k: profile(p, inputs) for k, p in paths.items()}
    macs_ratio = W.count(shrunk, inputs)[1] / W.count(model, inputs)[1]
    return summarize(name, spec.side, macs_ratio, total_ms, kernels)


def summarize(
    name: str, side: int, macs_ratio: float, total_ms: dict[str, float], kernels: dict[str, list[dict]]
) -> dict:
    """``macs_ratio`` is the sweep's (torch's FLOP counter); the per-kind MACs come from the kernels' shapes."""
    dense, shrunk = by_kind(kernels["dense"]), by_kind(kernels["shrunk"])
    kernel_ms = {k: sum(r["ms"] for r in v) for k, v in kernels.items()}
    every = kernels["dense"] + kernels["shrunk"]
    macs_per_ms = max(k["macs"] / k["ms"] for k in every if k["kind"] == "gemm" and k["ms"] > 0)
    bytes_per_ms = max(k["bytes"] / k["ms"] for k in every if k["ms"] > 0)
    roof = {key: sum(roofline_ms(k, macs_per_ms, bytes_per_ms) for k in v) for key, v in kernels.items()}
    row = {
        "model": name,
        "side": side,
        "latency_ratio": total_ms["shrunk"] / total_ms["dense"],
        "macs_ratio": macs_ratio,
        "kernel_ratio": kernel_ms["shrunk"] / kernel_ms["dense"],
        "overhead_share": max(0.0, 1 - kernel_ms["dense"] / total_ms["dense"]),
        "kinds": {},
    }
    ideal_ms = 0.0
    for kind in sorted(dense):
        d, s = dense[kind], shrunk.get(kind, {"ms": 0.0, "macs": 0, "bytes": 0, "kernels": 0})
        r_macs = s["macs"] / d["macs"] if d["macs"] else None
        r_bytes = s["bytes"] / d["bytes"] if d["bytes"] else None
        best = r_macs if kind == "gemm" else min(x for x in (r_macs, r_bytes) if x is not None)
        ideal_ms += d["ms"] * best
        row["kinds"][kind] = {
            "share": d["ms"] / kernel_ms["dense"],
            "time_ratio": s["ms"] / d["ms"],
            "macs_ratio": r_macs,
            "bytes_ratio": r_bytes,
            "kernels": d["kernels"],
        }
    row["latency_over_macs"] = row["latency_ratio"] / macs_ratio
    row["kernel_over_macs"] = row["kernel_ratio"] / macs_ratio
    row["bound"] = ideal_ms / kernel_ms["dense"] / macs_ratio
    row["roofline_over_macs"] = roof["shrunk"] / roof["dense"] / macs_ratio
    row["peak_gmacs_per_s"], row["peak_gbytes_per_s"] = macs_per_ms / 1e6, bytes_per_ms / 1e6
    return row


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


KINDS = ("gemm", "grouped", "per-channel")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# onnxruntime latency of 50 %-pruned models, by kernel kind",
        "",
        meta["note"],
        "",
        harness.load_line(meta),
        "",
        "Columns: latency ratio (shrunk / dense, whole run) over the MACs ratio; the same for kernel time only; "
        "the share of the dense run spent outside kernels; per kind (gemm: convs with one group, Gemm, MatMul; "
        "grouped: grouped convs; per-channel: depthwise convs and everything else) the share of dense kernel "
        "time and the time · MACs · bytes ratios; `bound`: the latency/MACs of a perfect runtime (gemm kernels "
        "at their dense MACs per second, other kernels at the smaller of their MACs and bytes ratios, no "
        "overhead); `roofline`: latency/MACs that a roofline model predicts from the kernels' shapes alone "
        "(each kernel takes max(MACs / peak MAC rate, bytes / peak byte rate), peaks = the best rates any "
        "kernel of the model reached).",
        "",
        "| model | side | MACs ratio | lat/MACs | kernels/MACs | overhead share | "
        + " | ".join(f"{k} share | {k} time · MACs · bytes" for k in KINDS)
        + " | bound | roofline |",
        "|---|---|---|---|---|---|" + "---|---|" * len(KINDS) + "---|---|",
    ]
    for r in rows:
        cells = []
        for kind in KINDS:
            k = r["kinds"].get(kind)
            cells += (
                ["", ""]
                if k is None
                else [
                    _fmt(k["share"]),
                    f"{_fmt(k['time_ratio'], 3)} · {_fmt(k['macs_ratio'], 3)} · {_fmt(k['bytes_ratio'], 3)}",
                ]
            )
        lines.append(
            f"| {r['model']} | {r['side']} | {r['macs_ratio']:.3f} | {r['latency_over_macs']:.2f} | "
            f"{r['kernel_over_macs']:.2f} | {r['overhead_share']:.2f} | "
            + " | ".join(cells)
            + f" | **{r['bound']:.2f}** | {r['roofline_over_macs']:.2f} |"
        )
    lines += ["", "```", meta["command"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--round-to", type=int, default=16, help="channel_prune round_to (the sweep's default)")
    ap.add_argument("--budget-s", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ort_latency_breakdown.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    machine = harness.machine(threads=1, clock="cpu")
    rows = []
    for name in args.models.split(","):
        row = measure(name, args.round_to, args.budget_s)
        rows.append(row)
        print(
            f"{name:20s} lat/MACs {row['latency_over_macs']:.2f} kernels/MACs {row['kernel_over_macs']:.2f} "
            f"bound {row['bound']:.2f} roofline {row['roofline_over_macs']:.2f}",
            flush=True,
        )
    meta = {
        **harness.finish(machine),
        "command": f"python benchmarks/ort_latency_breakdown.py --models {args.models} "
        f"--round-to {args.round_to} --budget-s {args.budget_s} --out {args.out}",
        "note": f"channel_prune ratio 0.5, round_to {args.round_to}; input sides as in the sweep; batch 1; "
        f"onnxruntime 1 thread; whole-run latency on the thread's CPU clock (steady-state median of "
        f"interleaved rounds), kernel times from onnxruntime's profiler "
        f"(median of {PROFILED_RUNS} runs); {machine['machine']}, torch {torch.__version__}.",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    harness.write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, meta))


if __name__ == "__main__":
    main()
