"""``OrtGraph``: a whole dense graph run by one onnxruntime session.

``lower`` keeps it where the model run densely by onnxruntime is measured faster than the model on the sparse
kernels (a model not sparse enough, or one made of layers the sparse kernels do not speed up): lowering never
leaves a model slower than the dense runtime it is compared with. The ONNX model is a ``uint8`` buffer, so it is
saved and loaded by ``sparsifx.save`` / ``load`` like any tensor; the session is built on first use, never saved.

A file is untrusted input: before a session is built, the bytes are parsed within a size limit (no external
data), checked by ``onnx.checker`` and imported with ``load_onnx``'s op allow-list (``ONNX_OPS``), so that
onnxruntime only ever sees standard operators that sparsifx also knows how to run. Inference only; a tracing leaf.
"""

from __future__ import annotations

import io

import torch
import torch.nn as nn

from sparsifx.errors import BackendError
from sparsifx.tracing import register_leaf_type

from .ort_runtime import OrtSessionModule

MAX_MODEL_BYTES = 2 << 30  # protobuf's own limit
OPSET = 17


def export_bytes(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[bytes, int]:
    """``(ONNX model, number of outputs)`` of ``module`` on ``example_inputs``: the torchscript exporter of
    ``export_onnx`` at opset 17, every input and output with a dynamic first (batch) dimension."""
    from .onnx_export import EXPORTERS

    with torch.inference_mode():
        outputs = module(*example_inputs)
    n_out = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
    buffer = io.BytesIO()
    EXPORTERS.get("torchscript")(module, tuple(example_inputs), buffer, True, OPSET, n_out)
    return buffer.getvalue(), n_out


@register_leaf_type
class OrtGraph(OrtSessionModule, nn.Module):
    """``outputs = onnxruntime(model)(*inputs)``: float32 tensors in, a tensor (one output) or a tuple out."""

    def __init__(self, onnx_model: bytes, n_inputs: int, n_outputs: int):
        super().__init__()
        self.n_inputs, self.n_outputs = int(n_inputs), int(n_outputs)
        with torch.inference_mode(False):
            self.register_buffer("model", torch.frombuffer(bytearray(onnx_model), dtype=torch.uint8).clone())
        self._validate()

    @classmethod
    def from_module(cls, module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> OrtGraph:
        data, n_out = export_bytes(module, example_inputs)
        return cls(data, len(example_inputs), n_out)

    def _validate(self) -> None:
        import onnx

        from .onnx_import import ImportLimits, to_graph_module

        if self.model.dtype != torch.uint8 or self.model.dim() != 1 or self.model.numel() > MAX_MODEL_BYTES:
            raise BackendError(f"OrtGraph: the model must be a 1-D uint8 buffer of at most {MAX_MODEL_BYTES} bytes")
        try:
            proto = onnx.load_from_string(self.onnx_bytes())
            onnx.checker.check_model(proto)
        except Exception as exc:  # protobuf and checker errors of many types
            raise BackendError(f"OrtGraph: not a valid ONNX model: {type(exc).__name__}: {exc}") from None
        to_graph_module(proto, ImportLimits())  # op allow-list, size limits, no external data (OnnxImportError)
        n_in = len([i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}])
        if (n_in, len(proto.graph.output)) != (self.n_inputs, self.n_outputs):
            raise BackendError(
                f"OrtGraph: the model has {n_in} inputs and {len(proto.graph.output)} outputs, "
                f"the module says {self.n_inputs} and {self.n_outputs}"
            )

    def _after_load(self) -> None:
        """Called by ``sparsifx.load``: the bytes are checked before any session reads them."""
        self.drop_transient()
        self._validate()

    def onnx_bytes(self) -> bytes:
        return self.model.numpy().tobytes()

    def forward(self, *inputs: torch.Tensor):
        self.check_inference(*inputs)
        if len(inputs) != self.n_inputs or any(x.dtype != torch.float32 for x in inputs):
            raise BackendError(f"OrtGraph takes {self.n_inputs} float32 tensors; got {[x.dtype for x in inputs]}")
        sess = self.session()
        feed = {i.name: x.detach().contiguous().numpy() for i, x in zip(sess.get_inputs(), inputs)}
        outs = tuple(torch.from_numpy(y) for y in sess.run(None, feed))
        return outs[0] if self.n_outputs == 1 else outs

    def extra_repr(self) -> str:
        return f"inputs={self.n_inputs}, outputs={self.n_outputs}, onnx_bytes={self.model.numel()}"
