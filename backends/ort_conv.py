"""``OrtConv2d``: a dense Conv2d (+ fused ReLU / ReLU6) run by onnxruntime, for layers where dense wins.

Where ``lower`` keeps a convolution dense (a stem with three input channels, a depthwise layer, a layer not sparse
enough), onnxruntime's convolution is often faster than torch's on a CPU, more so at larger batches. The session
is built from a one-node graph this module writes itself (the weights as initializers), once per layer and
process, never saved; the weights are buffers, validated when loaded from a file. Inference only; a tracing leaf.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sparsifx.errors import BackendError
from sparsifx.tracing import register_leaf_type

from .ort_runtime import OrtSessionModule

# fused activation -> (ONNX op, attributes)
ORT_ACTIVATIONS = {None: None, "relu": ("Relu", {}), "relu6": ("Clip", {"min": 0.0, "max": 6.0})}


def supported(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


@register_leaf_type
class OrtConv2d(OrtSessionModule, nn.Module):
    """``act(conv2d(x, W, b))`` in an onnxruntime session (float32 NCHW)."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, *, activation: str | None = None):
        super().__init__()
        if not supported(conv):
            raise BackendError(f"OrtConv2d needs zero padding given as numbers; got {conv.padding!r}")
        if activation not in ORT_ACTIVATIONS:
            raise BackendError(f"unknown fused activation {activation!r}")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.activation = activation
        with torch.inference_mode(False):
            self.register_buffer("weight", weight.detach().float().clone().contiguous())
            self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())

    def _after_load(self) -> None:
        """Called by ``sparsifx.load``: the buffers must fit the layer's shape before a session is built."""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.weight.dtype != torch.float32 or tuple(self.weight.shape) != shape:
            raise BackendError(f"OrtConv2d: weight must be float32 of shape {shape}")
        if self.bias is not None and (self.bias.dtype != torch.float32 or tuple(self.bias.shape) != shape[:1]):
            raise BackendError(f"OrtConv2d: bias must be float32 of shape ({shape[0]},)")
        if self.activation not in ORT_ACTIVATIONS:
            raise BackendError("OrtConv2d: unknown fused activation")
        self.drop_transient()

    def onnx_bytes(self) -> bytes:
        """A one-node graph (Conv, then Relu / Clip when fused) with the weights as initializers."""
        from onnx import TensorProto, helper, numpy_helper

        inits = [numpy_helper.from_array(self.weight.numpy(), "W")]
        inputs = ["x", "W"]
        if self.bias is not None:
            inits.append(numpy_helper.from_array(self.bias.numpy(), "b"))
            inputs.append("b")
        pads = [self.padding[0], self.padding[1], self.padding[0], self.padding[1]]
        act = ORT_ACTIVATIONS[self.activation]
        nodes = [
            helper.make_node(
                "Conv",
                inputs,
                ["c" if act else "y"],
                group=self.groups,
                kernel_shape=list(self.kernel_size),
                strides=list(self.stride),
                pads=pads,
                dilations=list(self.dilation),
            )
        ]
        if act is not None:
            op, attrs = act
            if op == "Clip":  # opset 11+: bounds are inputs
                inits += [
                    numpy_helper.from_array(torch.tensor(attrs["min"]).numpy(), "lo"),
                    numpy_helper.from_array(torch.tensor(attrs["max"]).numpy(), "hi"),
                ]
                nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
            else:
                nodes.append(helper.make_node(op, ["c"], ["y"]))
        dims = ["n", self.in_channels, "h", "w"]
        graph = helper.make_graph(
            nodes,
            "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return model.SerializeToString()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_inference(x)
        if x.dtype != torch.float32 or x.dim() != 4:
            raise BackendError(f"OrtConv2d computes on float32 NCHW input; got {x.dtype} {tuple(x.shape)}")
        return torch.from_numpy(self.session().run(None, {"x": x.detach().contiguous().numpy()})[0])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, fused={self.activation or 'none'}"
        )
