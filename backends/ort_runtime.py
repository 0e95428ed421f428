"""onnxruntime sessions as the runtime uses them, and the dense ONNX files it compares against.

``cpu_session`` is the one place that sets up a CPU session: ``threads`` intra-op threads (default: torch's count),
one inter-op thread, no spin-waiting (idle pool threads would steal the cores from whatever runs next).
``export_dense_onnx`` writes a model as the file onnxruntime dense, DeepSparse and ``load_onnx`` all read.
``OrtSessionModule`` is the mixin of the layers onnxruntime runs (``OrtConv2d``, ``OrtGraph``).
"""

from __future__ import annotations

import os

import torch

from sparsifx.errors import BackendError

from .transient import TransientState


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


class OrtSessionModule(TransientState):
    """Mixin of a module run by one onnxruntime CPU session: built on first use from ``onnx_bytes()``, never saved
    (``TransientState``), inference only."""

    TRANSIENT_ATTRS = ("_session",)

    def onnx_bytes(self) -> bytes:
        raise NotImplementedError

    def session(self):
        sess = self.__dict__.get("_session")
        if sess is None:
            sess = self.__dict__["_session"] = cpu_session(self.onnx_bytes())
        return sess

    def check_inference(self, *inputs: torch.Tensor) -> None:
        if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
            raise BackendError(
                f"{type(self).__name__} is inference-only; run it under torch.no_grad() or torch.inference_mode()"
            )
