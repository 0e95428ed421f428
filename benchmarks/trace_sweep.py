"""Trace sweep: every torchvision classification model through sparsifx.trace and export_onnx.

For each model (random weights, seed 0, BatchNorm statistics calibrated on one random batch and all-zero
weight matrices re-drawn, see ``calibrated_random_weights``; eval mode): build, ``sparsifx.trace``, compare the
GraphModule
with eager (``torch.testing.assert_close``), export with ``sparsifx.export_onnx(verify=True)`` (onnxruntime
on the example batch and on a batch of another size) and record times, opaque leaves, the exporter
used, the observed errors and, for any failure, the stage and cause.

    python benchmarks/trace_sweep.py --models all --out benchmarks/results/trace_sweep.json
    python benchmarks/trace_sweep.py --models resnet18,vit_b_16 --out /tmp/sweep.json

Each model runs in its own subprocess (``--one NAME``) with a timeout, so one crash or out-of-memory
cannot end the sweep. Writes the JSON and a markdown table with the same basename (``.md``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import harness  # noqa: E402
from benchmarks.models import informative_random_weights  # noqa: E402

DEFAULT_SIZE = 64
# model name -> (input side, constructor kwargs, why); the smallest input each model accepts cheaply
SPECIAL = {
    "inception_v3": (75, {}, "inception_v3 needs >= 75 px"),
    "maxvit_t": (224, {}, "maxvit_t's partition sizes are fixed for 224 px"),
    "vit_b_16": (64, {"image_size": 64}, "ViT built with image_size=64"),
    "vit_b_32": (64, {"image_size": 64}, "ViT built with image_size=64"),
    "vit_l_16": (64, {"image_size": 64}, "ViT built with image_size=64"),
    "vit_l_32": (64, {"image_size": 64}, "ViT built with image_size=64"),
    "vit_h_14": (56, {"image_size": 56}, "ViT built with image_size=56 (multiple of patch 14)"),
}
RESULT_MARK = "SWEEP_RESULT_JSON:"
# ONNX parity: |ort - torch| <= ONNX_TOL * |torch| + ONNX_TOL * max(1, max |torch|), on batch 1 and batch 3
ONNX_TOL = 1e-4
# ill-conditioned random-weight models (deep EfficientNets): torch's own fp32 output differs from fp64 by
# more than ONNX_TOL x scale; then ONNX parity is |ort - torch| <= NOISE_FACTOR x max|torch_fp32 - torch_fp64|
NOISE_FACTOR = 4.0
CALIBRATION_BATCH = 32


def all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def calibrated_random_weights(model: torch.nn.Module, side: int) -> torch.nn.Module:
    """Make random weights informative (``models.informative_random_weights``): re-draw all-zero weight matrices
    (ViT's zero-initialised head would make every output 0) and calibrate BatchNorm running statistics on one
    random batch of CALIBRATION_BATCH, only the norms in training mode (fresh statistics with random weights let
    activations grow to 1e8; statistics from a few samples leave near-zero variances at 2x2 feature maps that
    make deep EfficientNets chaotic, fp32 vs fp64 outputs differing by 1e2). Returns the model in eval mode."""
    return informative_random_weights(model, side, batch=CALIBRATION_BATCH, norms_only=True)


def _cause(stage: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{stage}: {type(exc).__name__}: {first[:400]}"


def sweep_one(name: str, workdir: str | os.PathLike | None = None, batch: int = 1) -> dict:
    """Build, trace, check eager parity and ONNX parity for one torchvision model; returns a record."""
    import torchvision

    import sparsifx

    size, kwargs, note = SPECIAL.get(name, (DEFAULT_SIZE, {}, ""))
    rec: dict = {
        "model": name,
        "input_shape": [batch, 3, size, size],
        "kwargs": kwargs,
        "note": note,
        "traced": False,
        "eager_parity": False,
        "onnx_ok": False,
        "error": None,
        "calibration_batch": CALIBRATION_BATCH,
    }
    torch.manual_seed(0)
    try:
        model = calibrated_random_weights(torchvision.models.get_model(name, weights=None, **kwargs), size)
    except Exception as exc:
        rec["error"] = _cause("build", exc)
        return rec
    rec["params"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(*rec["input_shape"], generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    try:
        gm = sparsifx.trace(model, copy_model=False)  # the model is ours: sharing weights halves peak memory
    except Exception as exc:
        rec["error"] = _cause("trace", exc)
        return rec
    rec.update(
        traced=True,
        trace_s=round(time.perf_counter() - t0, 3),
        opaque_leaves=list(gm.meta.get("opaque_leaves", [])),
        graph_nodes=len(gm.graph.nodes),
    )
    gm.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        expected = model(x)
        rec["eager_s"] = round(time.perf_counter() - t0, 3)
        try:
            actual = gm(x)
            rec["eager_max_abs"] = max(float((a - e).abs().max()) for a, e in zip(_leaves(actual), _leaves(expected)))
            rec["output_max_abs"] = max(float(e.abs().max()) for e in _leaves(expected))
            torch.testing.assert_close(actual, expected)
            rec["eager_parity"] = True
        except Exception as exc:
            rec["error"] = _cause("eager parity", exc)
            return rec
    del model, expected, actual
    gc.collect()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        try:
            info = _export_checked(gm, Path(tmp) / f"{name}.onnx", x, rec)
            rec.update(
                onnx_ok=True,
                onnx_exporter=info.exporter,
                onnx_fallback=info.fallback_reason or None,
                onnx_max_abs=info.max_abs,
                onnx_max_rel=info.max_rel,
                onnx_batches=[c.batch for c in info.checks],
            )
        except Exception as exc:
            rec["error"] = _cause("onnx", exc)
        rec["export_s"] = round(time.perf_counter() - t0, 3)
    return rec


def float32_noise(gm: torch.nn.Module, batches: list[tuple]) -> float:
    """Max |fp32 - fp64| of the module's own outputs: the rounding noise any float32 runtime has."""
    import copy

    ref = copy.deepcopy(gm).double().eval()
    worst = 0.0
    with torch.no_grad():
        for inputs in batches:
            lo = _leaves(gm(*inputs))
            hi = _leaves(ref(*(t.double() if t.is_floating_point() else t for t in inputs)))
            worst = max([worst] + [float((a.double() - b).abs().max()) for a, b in zip(lo, hi)])
    return worst


def _export_checked(gm, path: Path, x: torch.Tensor, rec: dict):
    """``export_onnx`` with a tolerance relative to the output scale; if that fails on a mismatch, the model's
    own float32 noise (fp32 vs fp64 torch) is measured and the check is repeated at NOISE_FACTOR x noise.
    Returns the passing export's ``ExportResult``."""
    import sparsifx
    from sparsifx.backends import onnx_export
    from sparsifx.errors import BackendError

    atol = ONNX_TOL * max(1.0, rec["output_max_abs"])  # error relative to the output's scale
    rec.update(onnx_atol=atol, onnx_tol_basis="output scale")
    try:
        return sparsifx.export_onnx(gm, path, (x,), dynamic_batch=True, verify=True, rtol=ONNX_TOL, atol=atol)
    except BackendError as exc:
        if "does not match torch" not in str(exc):
            raise
        rec["onnx_first_error"] = _cause("onnx", exc)
        noise = float32_noise(gm, [(x,), onnx_export._other_batch((x,))])
        rec["fp32_noise"] = noise
        if NOISE_FACTOR * noise <= atol:
            raise
    rec.update(onnx_atol=NOISE_FACTOR * noise, onnx_tol_basis="fp32 noise")
    return sparsifx.export_onnx(
        gm, path, (x,), dynamic_batch=True, verify=True, rtol=ONNX_TOL, atol=NOISE_FACTOR * noise
    )


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run_isolated(name: str, timeout: float) -> dict:
    """``sweep_one`` in a fresh interpreter; a crash or timeout becomes a named error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "model": name,
            "traced": False,
            "eager_parity": False,
            "onnx_ok": False,
            "error": f"timeout: the model took more than {timeout:.0f} s",
        }
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            rec = json.loads(line[len(RESULT_MARK) :])
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            return rec
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
    return {
        "model": name,
        "traced": False,
        "eager_parity": False,
        "onnx_ok": False,
        "error": f"crash: subprocess exited with {proc.returncode}: {tail}",
    }


def summary(records: list[dict]) -> dict:
    return {
        "models": len(records),
        "traced": sum(r["traced"] for r in records),
        "eager_parity": sum(r["eager_parity"] for r in records),
        "onnx_parity": sum(r["onnx_ok"] for r in records),
        "failures": {r["model"]: r["error"] for r in records if r.get("error")},
    }


def markdown(records: list[dict], meta: dict) -> str:
    s = summary(records)
    lines = [
        f"# Trace sweep: torchvision {meta['torchvision']}, torch {meta['torch']}",
        "",
        f"{s['models']} models: {s['traced']} traced, {s['eager_parity']} match eager, "
        f"{s['onnx_parity']} match onnxruntime (random weights, eval, batch 1 and 3).",
        "",
        "Eager parity: `torch.testing.assert_close(gm(x), model(x))` (float32 defaults). ONNX parity: "
        f"`|ort - torch| <= {ONNX_TOL} * |torch| + {ONNX_TOL} * max(1, max|torch|)` on the example batch "
        "and on a batch of 3 (dynamic batch axis). Weights are random (seed 0) with BatchNorm statistics "
        "calibrated on one random batch and all-zero weight matrices re-drawn (see "
        "`calibrated_random_weights`). Where that "
        "check fails, torch's own float32 noise is measured (max |fp32 - fp64| of the module on the same "
        f"inputs) and the check is repeated with atol = {NOISE_FACTOR} x noise (basis 'fp32 noise'); "
        "the first failure is kept in the JSON as `onnx_first_error`.",
        "",
        "| model | input | params (M) | traced | opaque leaves | eager max abs | ONNX exporter | ONNX max abs "
        "| ONNX atol (basis) | trace s | export+verify s | error |",
        "|---|---|---:|:---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in records:

        def num(key, fmt="{:.2e}"):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        leaves = ", ".join(r.get("opaque_leaves") or []) or "-"
        side = r.get("input_shape", ["?"] * 4)[-1]
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else "-"
        lines.append(
            f"| {r['model']} | {side} | {params} | {'yes' if r['traced'] else 'no'} | {leaves} | "
            f"{num('eager_max_abs')} | {r.get('onnx_exporter') or '-'} | {num('onnx_max_abs')} | "
            f"{num('onnx_atol')} ({r.get('onnx_tol_basis', '-')}) | {num('trace_s', '{:.2f}')} | "
            f"{num('export_s', '{:.1f}')} | "
            f"{(r.get('error') or '').replace('|', '/')} |"
        )
    other = [r["model"] for r in records if r.get("calibration_batch", CALIBRATION_BATCH) != CALIBRATION_BATCH]
    if other:
        lines += [
            "",
            f"BatchNorm statistics calibrated on 4 instead of {CALIBRATION_BATCH} samples (first pass of the "
            f"sweep, before the calibration batch was raised): {', '.join(other)}.",
        ]
    chaotic = [
        f"{r['model']} (noise {r['fp32_noise']:.2g}, output max {r['output_max_abs']:.2g})"
        for r in records
        if r.get("fp32_noise") is not None and r["fp32_noise"] > 0.1 * max(1.0, r["output_max_abs"])
    ]
    if chaotic:
        lines += [
            "",
            "Ill-conditioned at random weights (torch's own fp32-vs-fp64 difference exceeds 10% of the "
            "output scale), so ONNX parity there holds only within that noise: " + "; ".join(chaotic) + ".",
        ]
    fallbacks = [r for r in records if r.get("onnx_fallback")]
    if fallbacks:
        lines += ["", "Exporter fallbacks (the TorchScript exporter failed, the dynamo exporter was used):", ""]
        lines += [f"- {r['model']}: {r['onnx_fallback']}" for r in fallbacks]
    return "\n".join(lines) + "\n"


def write(records: list[dict], out: Path) -> None:
    import torchvision

    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    harness.write_results(out, {"meta": meta, "summary": summary(records), "results": records}, markdown(records, meta))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all", help="'all' or comma-separated torchvision model names")
    ap.add_argument("--out", default="benchmarks/results/trace_sweep.json")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", action="store_true", help="replace only these models' records in an existing --out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        print(RESULT_MARK + json.dumps(sweep_one(args.one)), flush=True)
        return 0
    names = all_models() if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(all_models()))
    if unknown:
        ap.error(f"unknown torchvision models: {', '.join(unknown)}")
    records = []
    out = Path(args.out)
    if args.merge and out.is_file():  # re-run some models, keep the other records
        records = [r for r in json.loads(out.read_text())["results"] if r["model"] not in names]
    for i, name in enumerate(names):
        rec = run_isolated(name, args.timeout)
        records.append(rec)
        order = {n: k for k, n in enumerate(all_models())}
        records.sort(key=lambda r: order.get(r["model"], len(order)))
        write(records, out)
        status = "ok" if rec["onnx_ok"] else f"FAIL {rec['error']}"
        print(f"[{i + 1}/{len(names)}] {name}: {status} ({rec.get('wall_s', '-')} s)", flush=True)
    s = summary(records)
    print(
        f"{s['models']} models: {s['traced']} traced, {s['eager_parity']} eager parity, {s['onnx_parity']} ONNX parity"
    )
    return 0 if s["onnx_parity"] == s["models"] else 1


if __name__ == "__main__":
    sys.exit(main())
