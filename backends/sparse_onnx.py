"""Sparse weights in ONNX files: ``to_sparse_initializers(model) -> model`` whose size follows the non-zeros.

Formats (``SPARSE_ONNX_FORMATS``):

- ``bitmask`` (default): a weight becomes ``<name>__bits`` (uint8, 1 bit per weight) + ``<name>__values`` (fp32,
  the non-zeros) and a small decode subgraph ``values[cumsum(bits) * bits]`` (BitShift, Mod, CumSum, Gather,
  Reshape) that onnxruntime constant-folds when the session is created: 4 bytes per non-zero + 1/8 byte per
  weight (90% sparse: 13% of dense). Needs opset >= 11.
- ``coo``: the standard ONNX ``sparse_initializer`` with linearized 1-D int64 indices (12 bytes per non-zero;
  onnxruntime densifies it at load): 30% of dense at 90% sparsity.

Only fp32 initializers with at least ``min_numel`` elements and ``min_sparsity`` zeros are converted.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from sparsifx.errors import BackendError
from sparsifx.registry import Registry

log = logging.getLogger(__name__)

SPARSE_ONNX_FORMATS: Registry[Callable] = Registry("sparse ONNX format")
SHIFTS, TWO = "sparsifx__bit_shifts", "sparsifx__two"


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


@SPARSE_ONNX_FORMATS.register("bitmask")
def _bitmask(model, name: str, array: np.ndarray) -> None:
    from onnx import TensorProto, helper, numpy_helper

    if _opset(model) < 11:
        raise BackendError(f"the bitmask sparse format needs ONNX opset >= 11, the model has {_opset(model)}")
    graph, flat = model.graph, array.reshape(-1)
    nz = flat != 0
    bits = np.packbits(nz, bitorder="little")
    values = np.concatenate([np.zeros(1, np.float32), flat[nz].astype(np.float32)])
    p = f"{name}__"
    graph.initializer.extend(
        [
            numpy_helper.from_array(bits, p + "bits"),
            numpy_helper.from_array(values, p + "values"),
            numpy_helper.from_array(np.array([bits.size, 1], np.int64), p + "bits_shape"),
            numpy_helper.from_array(np.array([flat.size], np.int64), p + "numel"),
            numpy_helper.from_array(np.array(array.shape, np.int64), p + "shape"),
        ]
    )
    if not any(i.name == SHIFTS for i in graph.initializer):
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.arange(8, dtype=np.uint8).reshape(1, 8), SHIFTS),
                numpy_helper.from_array(np.array(2, np.uint8), TWO),
                numpy_helper.from_array(np.array([0], np.int64), "sparsifx__zero"),
                numpy_helper.from_array(np.array([-1], np.int64), "sparsifx__minus_one"),
                numpy_helper.from_array(np.array(0, np.int64), "sparsifx__axis0"),
            ]
        )
    nodes = [
        helper.make_node("Reshape", [p + "bits", p + "bits_shape"], [p + "b2"]),
        helper.make_node("BitShift", [p + "b2", SHIFTS], [p + "shifted"], direction="RIGHT"),
        helper.make_node("Mod", [p + "shifted", TWO], [p + "bit8"]),
        helper.make_node("Reshape", [p + "bit8", "sparsifx__minus_one"], [p + "bitflat"]),
        helper.make_node("Slice", [p + "bitflat", "sparsifx__zero", p + "numel"], [p + "bit"]),
        helper.make_node("Cast", [p + "bit"], [p + "bit64"], to=TensorProto.INT64),
        helper.make_node("CumSum", [p + "bit64", "sparsifx__axis0"], [p + "rank"]),
        helper.make_node("Mul", [p + "rank", p + "bit64"], [p + "index"]),
        helper.make_node("Gather", [p + "values", p + "index"], [p + "flat"], axis=0),
        helper.make_node("Reshape", [p + "flat", p + "shape"], [name]),
    ]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)


@SPARSE_ONNX_FORMATS.register("coo")
def _coo(model, name: str, array: np.ndarray) -> None:
    from onnx import helper, numpy_helper

    flat = array.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[idx].astype(np.float32), name)
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, numpy_helper.from_array(idx, f"{name}__indices"), list(array.shape))
    )


def to_sparse_initializers(model, *, format: str = "bitmask", min_sparsity: float = 0.3, min_numel: int = 1024):
    """Return ``model`` (an ``onnx.ModelProto``, changed in place) with its sparse fp32 weights stored compactly.

    ``gm.meta``-free and framework-free: any ONNX model works. ``format`` names a ``SPARSE_ONNX_FORMATS`` entry.
    """
    from onnx import TensorProto, numpy_helper

    if format not in SPARSE_ONNX_FORMATS:
        raise BackendError(f"unknown sparse ONNX format '{format}'; available: {', '.join(SPARSE_ONNX_FORMATS)}")
    encode = SPARSE_ONNX_FORMATS.get(format)
    graph = model.graph
    input_names = {i.name for i in graph.input}
    converted, kept = [], []
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.data_location == TensorProto.EXTERNAL:
            kept.append(init)
            continue
        array = numpy_helper.to_array(init)
        if array.size < min_numel or 1.0 - np.count_nonzero(array) / array.size < min_sparsity:
            kept.append(init)
            continue
        converted.append((init.name, array))
    if not converted:
        return model
    names = {n for n, _ in converted}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if names & input_names:  # old-style exports list initializers as graph inputs too
        keep_inputs = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(keep_inputs)
    for name, array in converted:
        encode(model, name, array)
    log.info("stored %d sparse initializers as '%s'", len(converted), format)
    return model
