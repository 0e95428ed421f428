"""``sparsifx bench``: latency and throughput of the sparse runtime beside onnxruntime dense on the same weights.

A target is an ONNX file (dense weights with zeros, or sparse initializers: ``load_onnx`` lowers it) or a model
source of the CLI (``torchvision:resnet50``) that is pruned to ``sparsity`` (magnitude, uniform, first layer dense),
BatchNorm folded and lowered. onnxruntime runs the same file (a model is exported first). Each (threads, batch)
cell times both engines interleaved and reports medians; the outputs are compared once per cell.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import CliError
from .meta_keys import LOWER_SUMMARY


@dataclass(frozen=True)
class BenchRow:
    threads: int
    batch: int
    sparsifx_ms: float
    onnxruntime_ms: float
    speedup: float
    sparsifx_per_s: float
    onnxruntime_per_s: float
    max_abs_diff: float
    runs_on: str  # "sparse kernels", or "onnxruntime" where lower measured the whole dense model faster


def prepare_file(target: str, sparsity: float | None, input_shape, folder: Path) -> tuple[Path, tuple[int, ...] | None]:
    if target.endswith(".onnx") and Path(target).is_file():
        return Path(target), input_shape
    if ":" not in target:
        raise CliError(f"bench: '{target}' is neither an .onnx file nor a model source like torchvision:resnet50")
    if sparsity is None:
        raise CliError("bench: a model source needs --sparsity (e.g. 0.9)")
    return export_pruned(target, sparsity, input_shape, folder)


def export_pruned(source: str, sparsity: float, input_shape, folder: Path) -> tuple[Path, tuple[int, ...]]:
    import sparsifx
    from sparsifx.backends.ort_runtime import export_dense_onnx

    from .cli import build
    from .masking import bake_masks

    built = build(source, input_shape)
    model, example = built.model, built.inputs
    pruned = sparsifx.sparsify(
        model,
        {
            "stages": [
                {"pass": "magnitude", "sparsity": sparsity, "distribution": "uniform", "dense_first_layer": True},
                {"pass": "fold_bn"},
            ]
        },
        example_inputs=example,
    ).eval()
    bake_masks(pruned)
    path = folder / "model.onnx"
    export_dense_onnx(pruned, example, path)
    return path, tuple(example[0].shape)


def bench(
    target: str,
    *,
    batches=(1,),
    threads=(1,),
    reps: int = 20,
    sparsity: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    from sparsifx.backends import load_onnx
    from sparsifx.backends.cost_model import median_ms
    from sparsifx.backends.ort_runtime import cpu_session

    rows = []
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="sparsifx-bench-") as tmp:
        path, shape = prepare_file(target, sparsity, input_shape, Path(tmp))
        try:
            for t in threads:
                torch.set_num_threads(t)
                for b in batches:
                    gm = load_onnx(path, batch_size=b)
                    x = _input(gm, b, shape)
                    sess = cpu_session(path, t)
                    name = sess.get_inputs()[0].name
                    xn = x.numpy()
                    with torch.inference_mode():
                        diff = float((gm(x) - torch.from_numpy(sess.run(None, {name: xn})[0])).abs().max())
                        ms = median_ms(
                            {"sparsifx": lambda: gm(x), "ort": lambda: sess.run(None, {name: xn})}, reps=reps
                        )
                    row = BenchRow(
                        t,
                        b,
                        round(ms["sparsifx"], 3),
                        round(ms["ort"], 3),
                        round(ms["ort"] / ms["sparsifx"], 2),
                        round(1e3 * b / ms["sparsifx"], 1),
                        round(1e3 * b / ms["ort"], 1),
                        diff,
                        runs_on(gm.meta.get(LOWER_SUMMARY, {})),
                    )
                    rows.append(row)
                    if progress:
                        progress(format_row(row))
        finally:
            torch.set_num_threads(before)
    return rows


def runs_on(summary: dict, kernels: str = "sparse kernels") -> str:
    """What a lowered model runs on, from its ``lower_summary``: onnxruntime on the whole dense graph, or the
    sparse kernels (``kernels``), N samples at a time where ``lower``'s micro-batch step chose chunks."""
    if summary.get("whole_model", {}).get("kept") == "onnxruntime":
        return "onnxruntime"
    chunks = summary.get("micro_batch") or {}
    return f"{kernels}, {chunks['size']} at a time" if chunks.get("kept") == "chunks" else kernels


def _input(gm, batch: int, shape) -> torch.Tensor:
    from .meta_keys import EXAMPLE_INPUTS

    example = gm.meta.get(EXAMPLE_INPUTS)
    if example:
        return torch.randn(batch, *example[0].shape[1:])
    if shape is None:
        raise CliError("bench: give --input-shape for this file")
    return torch.randn(batch, *shape[1:])


HEADER = "threads  batch  sparsifx ms  onnxruntime ms  speedup  sparsifx/s  onnxruntime/s  max |diff|  runs on"


def format_row(r: BenchRow) -> str:
    return (
        f"{r.threads:7d}  {r.batch:5d}  {r.sparsifx_ms:11.3f}  {r.onnxruntime_ms:14.3f}  {r.speedup:6.2f}x  "
        f"{r.sparsifx_per_s:10.1f}  {r.onnxruntime_per_s:13.1f}  {r.max_abs_diff:10.2e}  {r.runs_on}"
    )


def as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
