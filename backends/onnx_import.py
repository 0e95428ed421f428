"""``load_onnx(path)``: an ONNX file (dense weights with zeros, or ``sparse_weights=True`` / COO sparse
initializers) into a ``torch.fx.GraphModule``, lowered by ``lower`` onto the sparse kernels.

This is how a model arrives without its Python code (a DeepSparse user's file). Each ONNX op becomes one fx node
through ``ONNX_OPS`` (op type -> builder); weights become ``nn.Conv2d`` / ``nn.Linear`` / ``nn.LayerNorm`` modules
so that ``lower`` sees layers. An op without a builder is an ``OnnxImportError`` naming the node, the op and the
supported ops; nothing in the file becomes code (``onnx_constants`` evaluates the constant part in numpy within
size limits; external data is refused).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .onnx_constants import OnnxImportError, _attr, fold_constants


@dataclass(frozen=True)
class ImportLimits:
    """Bounds on what ``load_onnx`` accepts (a file is untrusted input)."""

    max_file_bytes: int = 4 << 30
    max_nodes: int = 100_000
    max_elements: int = 1 << 28  # per constant tensor


class _Builder:
    """Turns ONNX nodes into fx nodes on ``graph``; modules collect in ``root``."""

    def __init__(self, consts: dict[str, np.ndarray]):
        self.graph, self.root, self.env = fx.Graph(), nn.Module(), {}
        self.consts = consts
        self.count = 0

    def const(self, name: str, where: str) -> np.ndarray:
        if name not in self.consts:
            raise OnnxImportError(f"{where}: input '{name}' must be a constant (a weight) for this op")
        return self.consts[name]

    def value(self, name: str, where: str):
        """An fx node, or a constant as a tensor attribute of the root."""
        if name in self.env:
            return self.env[name]
        if name in self.consts:
            attr = f"const_{self.count}"
            self.count += 1
            self.root.register_buffer(attr, torch.from_numpy(np.array(self.consts[name], copy=True)))
            self.env[name] = self.graph.get_attr(attr)
            return self.env[name]
        raise OnnxImportError(f"{where}: input '{name}' is not produced by any earlier node")

    def module(self, node, module: nn.Module, x) -> fx.Node:
        name = f"{node.op_type.lower()}_{self.count}"
        self.count += 1
        self.root.add_module(name, module)
        return self.graph.call_module(name, (x,))


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _pads(node, where: str, dims: int = 2) -> tuple[int, ...]:
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise OnnxImportError(f"{where}: auto_pad is not supported; export with explicit pads")
    pads = list(_attr(node, "pads", [0] * 2 * dims))
    if pads[:dims] != pads[dims:]:
        raise OnnxImportError(f"{where}: asymmetric pads {pads} are not supported")
    return tuple(pads[:dims])


def _conv(b: _Builder, node, where: str):
    w = b.const(node.input[1], where)
    if w.ndim != 4:
        raise OnnxImportError(f"{where}: only 2-D convolutions are supported (weight {w.shape})")
    groups = _attr(node, "group", 1)
    conv = nn.Conv2d(
        w.shape[1] * groups,
        w.shape[0],
        tuple(w.shape[2:]),
        tuple(_attr(node, "strides", [1, 1])),
        _pads(node, where),
        tuple(_attr(node, "dilations", [1, 1])),
        groups,
        bias=len(node.input) > 2 and bool(node.input[2]),
    )
    with torch.no_grad():
        conv.weight.copy_(_tensor(w))
        if conv.bias is not None:
            conv.bias.copy_(_tensor(b.const(node.input[2], where)))
    return b.module(node, conv, b.value(node.input[0], where))


def _gemm(b: _Builder, node, where: str):
    if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
        raise OnnxImportError(f"{where}: Gemm with transA, alpha or beta is not supported")
    w = b.const(node.input[1], where)
    w = w if _attr(node, "transB", 0) else w.T
    lin = nn.Linear(w.shape[1], w.shape[0], bias=len(node.input) > 2 and bool(node.input[2]))
    with torch.no_grad():
        lin.weight.copy_(_tensor(w))
        if lin.bias is not None:
            lin.bias.copy_(_tensor(np.broadcast_to(b.const(node.input[2], where), (w.shape[0],))))
    return b.module(node, lin, b.value(node.input[0], where))


def _matmul(b: _Builder, node, where: str):
    if node.input[1] not in b.consts or b.consts[node.input[1]].ndim != 2:
        return b.graph.call_function(torch.matmul, (b.value(node.input[0], where), b.value(node.input[1], where)))
    w = b.consts[node.input[1]].T  # x @ W (K, N) -> Linear(K, N)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(_tensor(w))
    return b.module(node, lin, b.value(node.input[0], where))


def _batchnorm(b: _Builder, node, where: str):
    scale, bias, mean, var = (b.const(n, where) for n in node.input[1:5])
    bn = nn.BatchNorm2d(scale.shape[0], eps=_attr(node, "epsilon", 1e-5)).eval()
    with torch.no_grad():
        for t, v in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
            t.copy_(_tensor(v))
    return b.module(node, bn, b.value(node.input[0], where))


def _layernorm(b: _Builder, node, where: str):
    if _attr(node, "axis", -1) != -1:
        raise OnnxImportError(f"{where}: LayerNormalization over more than the last axis is not supported")
    weight = b.const(node.input[1], where)
    ln = nn.LayerNorm(weight.shape[0], eps=_attr(node, "epsilon", 1e-5))
    with torch.no_grad():
        ln.weight.copy_(_tensor(weight))
        ln.bias.copy_(
            _tensor(b.const(node.input[2], where))
            if len(node.input) > 2 and node.input[2]
            else torch.zeros_like(ln.bias)
        )
    return b.module(node, ln, b.value(node.input[0], where))


def _maxpool(b: _Builder, node, where: str):
    if _attr(node, "ceil_mode", 0) or any(d != 1 for d in _attr(node, "dilations", [1, 1])) or len(node.output) > 1:
        raise OnnxImportError(f"{where}: MaxPool with ceil_mode, dilations or indices is not supported")
    k = tuple(_attr(node, "kernel_shape"))
    pool = nn.MaxPool2d(k, tuple(_attr(node, "strides", [1, 1])), _pads(node, where))
    return b.module(node, pool, b.value(node.input[0], where))


def _avgpool(b: _Builder, node, where: str):
    k = tuple(_attr(node, "kernel_shape"))
    pool = nn.AvgPool2d(
        k,
        tuple(_attr(node, "strides", [1, 1])),
        _pads(node, where),
        ceil_mode=bool(_attr(node, "ceil_mode", 0)),
        count_include_pad=bool(_attr(node, "count_include_pad", 0)),
    )
    return b.module(node, pool, b.value(node.input[0], where))


def onnx_reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX ``Reshape`` (a 0 copies the input's dimension, -1 is inferred)."""
    dims = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(shape.tolist())]
    return x.reshape(dims)


def _call(fn: Callable, n_inputs: int | None = None, **kw_from_attrs: Callable) -> Callable:
    def build(b: _Builder, node, where: str):
        inputs = node.input if n_inputs is None else node.input[:n_inputs]
        args = tuple(b.value(i, where) for i in inputs if i)
        kwargs = {k: f(node) for k, f in kw_from_attrs.items()}
        return b.graph.call_function(fn, args, kwargs)

    return build


def _module_op(factory: Callable[[Any], nn.Module]) -> Callable:
    def build(b: _Builder, node, where: str):
        return b.module(node, factory(node), b.value(node.input[0], where))

    return build


def _clip(b: _Builder, node, where: str):
    lo = float(b.const(node.input[1], where)) if len(node.input) > 1 and node.input[1] else _attr(node, "min")
    hi = float(b.const(node.input[2], where)) if len(node.input) > 2 and node.input[2] else _attr(node, "max")
    if lo == 0.0 and hi == 6.0:
        return b.module(node, nn.ReLU6(), b.value(node.input[0], where))
    return b.graph.call_function(torch.clamp, (b.value(node.input[0], where),), {"min": lo, "max": hi})


def _reduce_mean(b: _Builder, node, where: str):
    axes = _attr(node, "axes")
    if len(node.input) > 1 and node.input[1]:  # opset 18+: axes are an input
        axes = [int(a) for a in np.asarray(b.const(node.input[1], where)).reshape(-1)]
    if axes is None:
        raise OnnxImportError(f"{where}: ReduceMean over all axes is not supported; name the axes")
    keep = bool(_attr(node, "keepdims", 1))
    return b.graph.call_function(torch.mean, (b.value(node.input[0], where),), {"dim": tuple(axes), "keepdim": keep})


# ONNX op type -> builder(builder, node, where) -> fx node of the node's (single) output
ONNX_OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "Relu": _module_op(lambda n: nn.ReLU()),
    "Clip": _clip,
    "Sigmoid": _call(torch.sigmoid),
    "Tanh": _call(torch.tanh),
    "Erf": _call(torch.erf),
    "Add": _call(operator.add),
    "Sub": _call(operator.sub),
    "Mul": _call(operator.mul),
    "Div": _call(operator.truediv),
    "ReduceMean": _reduce_mean,
    "GlobalAveragePool": _module_op(lambda n: nn.AdaptiveAvgPool2d(1)),
    "Flatten": _call(torch.flatten, 1, start_dim=lambda n: _attr(n, "axis", 1)),
    "Reshape": _call(onnx_reshape, 2),
    "Transpose": _call(torch.permute, 1, dims=lambda n: tuple(_attr(n, "perm"))),
    "Softmax": _call(torch.softmax, 1, dim=lambda n: _attr(n, "axis", -1)),
    "Concat": lambda b, n, w: b.graph.call_function(
        torch.cat, ([b.value(i, w) for i in n.input],), {"dim": _attr(n, "axis")}
    ),
    "Identity": lambda b, n, w: b.value(n.input[0], w),
    "Gelu": _call(
        F.gelu,
        1,
        approximate=lambda n: (
            _attr(n, "approximate", b"none").decode()
            if isinstance(_attr(n, "approximate", b"none"), bytes)
            else _attr(n, "approximate", "none")
        ),
    ),
}


def to_graph_module(model, limits: ImportLimits = ImportLimits()) -> tuple[fx.GraphModule, list[tuple[int, ...]]]:
    """``(GraphModule, input shapes)`` of an ``onnx.ModelProto`` (no lowering)."""
    if len(model.graph.node) > limits.max_nodes:
        raise OnnxImportError(f"the graph has {len(model.graph.node)} nodes; the import limit is {limits.max_nodes}")
    consts, nodes = fold_constants(model, limits.max_elements)
    b = _Builder(consts)
    shapes = []
    for inp in model.graph.input:
        if inp.name in consts:
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes.append(tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims))
        b.env[inp.name] = b.graph.placeholder(f"input_{len(shapes) - 1}")
    for node in nodes:
        where = f"node '{node.name}' ({node.op_type})"
        if node.domain not in ("", "ai.onnx") or node.op_type not in ONNX_OPS:
            raise OnnxImportError(f"{where}: op has no import rule; supported: {', '.join(sorted(ONNX_OPS))}")
        if len([o for o in node.output if o]) != 1:
            raise OnnxImportError(f"{where}: ops with several outputs are not supported")
        b.env[node.output[0]] = ONNX_OPS[node.op_type](b, node, where)
    outs = [b.value(o.name, "graph output") for o in model.graph.output]
    b.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    gm = fx.GraphModule(b.root, b.graph, class_name="OnnxModel")
    gm.graph.lint()
    return gm.eval(), shapes


def read_model(path: str | os.PathLike, limits: ImportLimits = ImportLimits()):
    import onnx

    size = os.path.getsize(path)
    if size > limits.max_file_bytes:
        raise OnnxImportError(f"{path}: {size} bytes exceed the import limit of {limits.max_file_bytes}")
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxImportError(f"{path}: not a readable ONNX model: {type(exc).__name__}: {exc}") from exc


def load_onnx(
    path: str | os.PathLike,
    *,
    batch_size: int = 1,
    lower: bool = True,
    recipe_stages: list | None = None,
    limits: ImportLimits = ImportLimits(),
) -> fx.GraphModule:
    """The model in ``path`` as a GraphModule, lowered onto the sparse kernels for ``batch_size`` (``lower=False``:
    plain torch layers). A symbolic input dimension is taken as ``batch_size`` (first) or must be fixed."""
    import sparsifx

    gm, shapes = to_graph_module(read_model(path, limits), limits)
    if not lower:
        return gm
    inputs = []
    for i, shape in enumerate(shapes):
        dims = [batch_size if (d < 1 and j == 0) else d for j, d in enumerate(shape)]
        if any(d < 1 for d in dims):
            raise OnnxImportError(f"input {i} has symbolic dimensions {shape} beyond the batch; fix them in the file")
        inputs.append(torch.randn(dims))
    stages = (recipe_stages or []) + [{"pass": "fold_bn"}, {"pass": "lower"}]
    return sparsifx.sparsify(gm, {"stages": stages}, example_inputs=tuple(inputs)).eval()
