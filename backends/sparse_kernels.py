"""Sparse (and dense) executions of ``W @ X`` for lowered Linear / Conv2d layers, by name.

``SPARSE_KERNELS`` is the registry; each kernel packs a (masked) weight into buffers once and then runs
``linear(x2d, packed, bias)`` (``[B, K] -> [B, out]``) and ``matmul_cols(X, packed, bias)``
(``[N, K, M] -> [N, out, M]``, the im2col form a convolution lowers to).

- ``dense``: ``F.linear`` / ``torch.bmm`` on the dense weight (torch's own GEMM).
- ``csr``: torch.sparse CSR (``to_sparse_csr`` + ``torch.sparse.mm``), the plain baseline.
- ``csr_tiled``: CSR with 16-bit column indices and a C++ kernel that runs 64-column register tiles of ``X``
  (``backends/cpp_kernel.py``, compiled on first use).
- ``dense_ort``: onnxruntime's dense Gemm (Linear only; often faster than torch's GEMM on CPU).
"""

from __future__ import annotations

import logging
import warnings
from typing import Protocol

import torch
import torch.nn.functional as F

from sparsifx.errors import BackendError
from sparsifx.registry import Registry

from . import cpp_kernel
from .ort_runtime import cpu_session

log = logging.getLogger(__name__)


class SparseKernel(Protocol):
    name: str
    sparse: bool  # stores only non-zeros
    supports_conv: bool  # has ``matmul_cols``

    def available(self) -> bool: ...
    def pack(self, weight2d: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def linear(self, x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor: ...
    def matmul_cols(
        self, X: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor: ...


SPARSE_KERNELS: Registry[SparseKernel] = Registry("sparse kernel")


def _register(cls):
    SPARSE_KERNELS.register(cls.name, cls())
    return cls


@_register
class DenseKernel:
    """Torch dense GEMM on the masked weight."""

    name, sparse, supports_conv = "dense", False, True

    def available(self) -> bool:
        return True

    def pack(self, weight2d):
        return {"weight": weight2d.detach().contiguous().clone()}

    def linear(self, x, packed, bias):
        return F.linear(x, packed["weight"], bias)

    def matmul_cols(self, X, packed, bias):
        Y = torch.matmul(packed["weight"], X)
        return Y if bias is None else Y + bias.view(1, -1, 1)


def _csr_parts(weight2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = weight2d.detach().float().contiguous()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = w.to_sparse_csr()
    return csr.crow_indices().to(torch.int64), csr.col_indices().to(torch.int64), csr.values().contiguous()


@_register
class TorchCsrKernel:
    """``torch.sparse.mm`` on a CSR weight (plain torch.sparse baseline)."""

    name, sparse, supports_conv = "csr", True, True

    def available(self) -> bool:
        return True

    def pack(self, weight2d):
        rowptr, col, val = _csr_parts(weight2d)
        return {"rowptr": rowptr, "col": col, "val": val}

    def _csr(self, packed, ncols: int) -> torch.Tensor:
        rows = packed["rowptr"].numel() - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(packed["rowptr"], packed["col"], packed["val"], (rows, ncols))

    def linear(self, x, packed, bias):
        y = torch.sparse.mm(self._csr(packed, x.shape[1]), x.t()).t()
        return y if bias is None else y + bias

    def matmul_cols(self, X, packed, bias):
        N, K, M = X.shape
        Y = torch.sparse.mm(self._csr(packed, K), X.permute(1, 0, 2).reshape(K, N * M))
        Y = Y.view(-1, N, M).permute(1, 0, 2)
        return Y if bias is None else Y + bias.view(1, -1, 1)


@_register
class TiledCsrKernel:
    """CSR (uint16 column indices where K <= 65536) times 64-column tiles of X in a C++ kernel."""

    name, sparse, supports_conv = "csr_tiled", True, True

    def available(self) -> bool:
        return cpp_kernel.available()

    def pack(self, weight2d):
        rowptr, col, val = _csr_parts(weight2d)
        if weight2d.shape[1] <= 65536:  # stored as int16 bits, read as uint16 by the kernel
            col = (
                col.to(torch.int32).to(torch.uint16).view(torch.int16)
                if hasattr(torch, "uint16")
                else (col - 65536 * (col >= 32768)).to(torch.int16)
            )
        else:
            col = col.to(torch.int32)
        return {"rowptr": rowptr, "col": col, "val": val}

    def linear(self, x, packed, bias):
        return cpp_kernel.load().linear(packed["rowptr"], packed["col"], packed["val"], x, bias)

    def matmul_cols(self, X, packed, bias):
        return cpp_kernel.load().spmm(packed["rowptr"], packed["col"], packed["val"], X.float().contiguous(), bias)


@_register
class OrtDenseKernel:
    """onnxruntime's dense ``Gemm`` (one small session per layer, spinning threads off)."""

    name, sparse, supports_conv = "dense_ort", False, False

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def pack(self, weight2d):
        return {"weight": weight2d.detach().float().contiguous().clone()}

    def session(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """An onnxruntime session computing ``x @ weight.T + bias`` with the weights as initializers."""
        from onnx import TensorProto, helper, numpy_helper

        out_f, in_f = weight.shape
        inits = [numpy_helper.from_array(weight.detach().float().contiguous().numpy(), "W")]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.detach().float().contiguous().numpy(), "b"))
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["x", "W"] + (["b"] if bias is not None else []), ["y"], transB=1)],
            "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_f])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_f])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return cpu_session(model.SerializeToString())

    def linear(self, x, packed, bias, session=None):
        sess = session or self.session(packed["weight"], bias)
        return torch.from_numpy(sess.run(None, {"x": x.detach().float().contiguous().numpy()})[0])

    def matmul_cols(self, X, packed, bias):
        raise BackendError("kernel 'dense_ort' runs Linear layers only")


def get_kernel(name: str) -> SparseKernel:
    """The kernel ``name``; ``BackendError`` if unknown or unavailable on this machine."""
    if name not in SPARSE_KERNELS:
        raise BackendError(f"unknown sparse kernel '{name}'; available: {', '.join(SPARSE_KERNELS.names())}")
    kernel = SPARSE_KERNELS.get(name)
    if not kernel.available():
        raise BackendError(f"sparse kernel '{name}' is not available on this machine")
    return kernel
