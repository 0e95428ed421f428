"""onnxruntime sessions as the runtime uses them, and the dense ONNX files it compares against.

``cpu_session`` is the one place that sets up a CPU session: ``threads`` intra-op threads (default: torch's count),
one inter-op thread, no spin-waiting (idle pool threads would steal the cores from whatever runs next).
``export_dense_onnx`` writes a model as the file onnxruntime dense, DeepSparse and ``load_onnx`` all read.
"""

from __future__ import annotations

import os

import torch


def cpu_session(model: bytes | str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session of a serialized model (bytes) or an ONNX file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def export_dense_onnx(model: torch.nn.Module, example: tuple, path: str | os.PathLike) -> None:
    """``model`` (zeros kept, masks baked) to ONNX opset 17 with a dynamic batch: input ``x``, output ``y``
    (opset 17: DeepSparse 1.8 takes opset <= 19)."""
    torch.onnx.export(
        model,
        tuple(example),
        os.fspath(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
    )
