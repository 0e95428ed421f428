"""End to end: LeNet-300-100 and resnet50 at 90% unstructured sparsity (magnitude, ERK), lowered with ``lower``.

    python benchmarks/sparse_end_to_end.py --out benchmarks/results/sparse_end_to_end.json

Latency of the dense model, the masked model, the lowered model and the dense model in onnxruntime, at batch
1 and 32 (medians of interleaved runs in shuffled order; with ``--threads 1`` the clock is the CPU time of the
compute thread, immune to the share other processes take of a busy machine). The lowered model is checked
against the masked one. Then the resnet50 ONNX size check: the 90%-sparse model exported dense and with
``sparse_weights=True`` (bitmask initializers), size ratio and onnxruntime parity with torch.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.masking import bake_masks


def lenet_300_100() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


MODELS = {"lenet_300_100": (lenet_300_100, (1, 28, 28)),
          "resnet50": (lambda: torchvision.models.resnet50(), (3, 224, 224))}


def time_models(fns: dict, reps: int, clock: str) -> dict[str, float]:
    for f in fns.values():
        f()
    now = time.thread_time if clock == "cpu" else time.perf_counter
    times = {k: [] for k in fns}
    order = list(fns)
    for _ in range(reps):
        random.shuffle(order)
        for k in order:
            t0 = now()
            fns[k]()
            times[k].append((now() - t0) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def ort_session(model: nn.Module, x: torch.Tensor, path: Path):
    import onnxruntime as ort
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_model(name: str, sparsity: float, batches, reps: int, clock: str, tmp: Path) -> dict:
    ctor, shape = MODELS[name]
    torch.manual_seed(0)
    dense = ctor().eval()
    x1 = torch.randn(1, *shape)
    masked = sparsifx.sparsify(dense, {"stages": [{"pass": "magnitude", "sparsity": sparsity,
                                                   "distribution": "erk"}]}, example_inputs=(x1,)).eval()
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower"}]}, example_inputs=(x1,)).eval()
    extra = lowered.meta.get("report_extra", {})
    baked = copy.deepcopy(masked)
    bake_masks(baked)
    sess = ort_session(baked, x1, tmp / f"{name}_dense.onnx")
    out = {"model": name, "sparsity": sparsity, "layers": len(extra),
           "backends": dict(collections.Counter(v.get("backend", "?") for v in extra.values())),
           "per_layer": extra, "latency": {}}
    for b in batches:
        x = torch.randn(b, *shape)
        with torch.inference_mode():
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-3, atol=1e-3)
            t = time_models({"dense": lambda: dense(x), "masked": lambda: masked(x), "lowered": lambda: lowered(x),
                             "dense_ort": lambda: sess.run(None, {"x": x.numpy()})},
                            reps if b == 1 or name != "resnet50" else max(3, reps // 3), clock)
        t["lowered_vs_dense"] = round(t["dense"] / t["lowered"], 3)
        t["lowered_vs_best_dense"] = round(min(t["dense"], t["dense_ort"]) / t["lowered"], 3)
        out["latency"][str(b)] = t
        print(name, b, t, flush=True)
    return out


def onnx_size_check(sparsity: float, tmp: Path) -> dict:
    """resnet50 at ``sparsity`` exported dense and with sparse (bitmask) initializers."""
    import onnx
    import onnxruntime as ort
    from sparsifx.backends.sparse_onnx import to_sparse_initializers
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    masked = sparsifx.sparsify(torchvision.models.resnet50().eval(),
                               {"stages": [{"pass": "magnitude", "sparsity": sparsity, "distribution": "erk"}]},
                               example_inputs=(x[:1],)).eval()
    baked = copy.deepcopy(masked)
    bake_masks(baked)
    dense_path, sparse_path = tmp / "resnet50_dense.onnx", tmp / "resnet50_sparse.onnx"
    torch.onnx.export(baked, (x,), str(dense_path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}})
    result = {}
    for fmt in ("bitmask", "coo"):
        proto = to_sparse_initializers(onnx.load(str(dense_path)), format=fmt)
        onnx.save(proto, str(sparse_path))
        onnx.checker.check_model(str(sparse_path))
        sess = ort.InferenceSession(str(sparse_path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = baked(x)
        got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
        err = float((got - ref).abs().max())
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        result[fmt] = dict(dense_bytes=dense_path.stat().st_size, sparse_bytes=sparse_path.stat().st_size,
                           ratio=round(sparse_path.stat().st_size / dense_path.stat().st_size, 4),
                           ort_max_abs_err=err, ort_matches=True)
        print("onnx", fmt, result[fmt], flush=True)
    return result


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Sparse end to end ({m['threads']} thread(s), {m['clock']} clock, load average "
             f"{m['loadavg_start']} -> {m['loadavg_end']})", "",
             "90% unstructured sparsity, magnitude ERK (random-init weights), lowered by `lower` with the cost "
             "model calibrated on this machine. Median ms of interleaved runs.", "",
             "| model | batch | dense torch | masked | lowered | dense onnxruntime | lowered x dense | "
             "lowered x best dense |", "|---|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        for b, t in r["latency"].items():
            lines.append(f"| {r['model']} | {b} | {t['dense']} | {t['masked']} | {t['lowered']} | {t['dense_ort']} | "
                         f"{t['lowered_vs_dense']} | {t['lowered_vs_best_dense']} |")
    lines += ["", "Backends chosen: " + "; ".join(f"{r['model']}: {r['backends']}" for r in res["models"]), ""]
    if res.get("onnx"):
        lines += ["## resnet50 ONNX size at 90% sparsity", "", "| format | dense bytes | sparse bytes | ratio | "
                  "onnxruntime max abs err |", "|---|---|---|---|---|"]
        for fmt, o in res["onnx"].items():
            lines.append(f"| {fmt} | {o['dense_bytes']} | {o['sparse_bytes']} | {o['ratio']} | {o['ort_max_abs_err']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sparse_end_to_end.json")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = "cpu" if args.threads == 1 else "wall"
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        models = [run_model(m, args.sparsity, args.batches, args.reps, clock, Path(d)) for m in args.models]
        onnx_res = None if args.no_onnx else onnx_size_check(args.sparsity, Path(d))
    res = {"meta": dict(threads=args.threads, clock=clock, reps=args.reps, torch=torch.__version__,
                        loadavg_start=[round(v, 2) for v in load0],
                        loadavg_end=[round(v, 2) for v in os.getloadavg()], argv=sys.argv[1:]),
           "models": models, "onnx": onnx_res}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
