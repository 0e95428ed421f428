"""The constant part of an ONNX graph, evaluated in numpy: initializers, ``Constant`` nodes, sparse initializers
and the nodes computed from them only (the decode subgraph of ``sparse_onnx``'s bitmask format, a weight's
``Transpose`` or ``Reshape``).

The file is untrusted: only the ops in ``CONSTANT_OPS`` are evaluated, every produced array is bounded by
``max_elements``, external data is refused (it would read other files), and every failure is an ``OnnxImportError``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sparsifx.errors import BackendError


class OnnxImportError(BackendError):
    """An ONNX file that the sparse runtime cannot import (names the node, its op and what to do)."""


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _slice(node, x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _reshape(node, x, shape):
    shape = [x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


# op -> (node, *input arrays) -> output array
CONSTANT_OPS: dict[str, Callable] = {
    "Identity": lambda n, x: x,
    "Reshape": _reshape,
    "Transpose": lambda n, x: np.transpose(x, _attr(n, "perm")),
    "BitShift": lambda n, x, s: (
        (x >> s) if _attr(n, "direction") == b"RIGHT" or _attr(n, "direction") == "RIGHT" else (x << s)
    ),
    "Mod": lambda n, a, b: np.mod(a, b),
    "Slice": _slice,
    "Cast": lambda n, x: x.astype(__import__("onnx").helper.tensor_dtype_to_np_dtype(_attr(n, "to"))),
    "CumSum": lambda n, x, axis: np.cumsum(x, axis=int(axis)),
    "Mul": lambda n, a, b: a * b,
    "Add": lambda n, a, b: a + b,
    "Gather": lambda n, x, i: np.take(x, i, axis=_attr(n, "axis", 0)),
    "Unsqueeze": lambda n, x, axes=None: np.expand_dims(
        x, tuple(int(a) for a in (axes if axes is not None else _attr(n, "axes")))
    ),
    "Squeeze": lambda n, x, axes=None: np.squeeze(
        x, tuple(int(a) for a in (axes if axes is not None else _attr(n, "axes")))
    ),
}


def _sparse_to_dense(sparse) -> tuple[str, np.ndarray]:
    from onnx import numpy_helper

    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, dims)
    if flat.size and (flat.min() < 0 or flat.max() >= dense.size):
        raise OnnxImportError(f"sparse initializer '{sparse.values.name}' has indices outside its shape {dims}")
    dense[flat] = values
    return sparse.values.name, dense.reshape(dims)


def fold_constants(model, max_elements: int) -> tuple[dict[str, np.ndarray], list]:
    """``(constants by name, the nodes that remain)``: every value computable from the file alone, in numpy."""
    from onnx import TensorProto, numpy_helper

    consts: dict[str, np.ndarray] = {}
    total = 0

    def add(name: str, array: np.ndarray, where: str) -> None:
        nonlocal total
        total += array.size
        if array.size > max_elements or total > 4 * max_elements:
            raise OnnxImportError(
                f"{where}: constant '{name}' exceeds the import size limit ({max_elements} elements per tensor)"
            )
        consts[name] = array

    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            raise OnnxImportError(
                f"initializer '{init.name}' uses external data; the importer reads one file "
                "only: save the model with its weights inside (onnx.save without external data)"
            )
        add(init.name, numpy_helper.to_array(init), "initializer")
    for sparse in model.graph.sparse_initializer:
        name, dense = _sparse_to_dense(sparse)
        add(name, dense, "sparse initializer")
    rest = []
    for node in model.graph.node:
        where = f"node '{node.name}' ({node.op_type})"
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if value is None:
                raise OnnxImportError(f"{where}: only tensor-valued Constant nodes are supported")
            add(node.output[0], numpy_helper.to_array(value), where)
        elif node.op_type in CONSTANT_OPS and node.input and all(i in consts for i in node.input if i):
            try:
                out = CONSTANT_OPS[node.op_type](node, *[consts[i] if i else None for i in node.input])
            except (ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError) as exc:
                raise OnnxImportError(f"{where}: cannot evaluate this constant: {exc}") from exc
            add(node.output[0], np.asarray(out), where)
        else:
            rest.append(node)
    return consts, rest
