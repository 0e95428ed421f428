"""Lowered layers: ``SparseLinear`` and ``SparseConv2d`` run a registered sparse kernel (inference only).

``SparseLinear`` holds a *plan*: ``((max_rows, kernel), ...)`` ascending, the last bound ``None`` (unbounded).
The number of input rows (the batch, flattened) picks the kernel, so a layer can run ``csr_tiled`` at batch 1
and dense at batch 256 when that is what the machine measured; only the kernels in the plan are stored.
``SparseConv2d`` runs one kernel on the im2col form (``F.unfold``; 1x1 convolutions need no unfold).
Both are tracing leaves, hold their data in buffers (``state_dict`` works) and do not support autograd.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.errors import BackendError
from sparsifx.tracing import register_leaf_type

from .sparse_conv import conv_output_size, rowptr_is_valid
from .sparse_kernels import SPARSE_KERNELS, get_kernel
from .transient import TransientState

Plan = tuple[tuple[int | None, str], ...]
UNFOLD_BYTES = 4 << 20  # im2col block per kernel call in SparseConv2d


def _check_plan(plan: Sequence[tuple[int | None, str]]) -> Plan:
    plan = tuple((b, str(k)) for b, k in plan)
    if not plan or plan[-1][0] is not None:
        raise BackendError(f"a kernel plan must end with an unbounded entry (None, kernel); got {plan}")
    bounds = [b for b, _ in plan[:-1]]
    if any(not isinstance(b, int) or b < 1 for b in bounds) or bounds != sorted(set(bounds)):
        raise BackendError(f"plan bounds must be increasing positive integers; got {plan}")
    return plan


class _PackedMixin(TransientState):
    """Buffers ``<kernel>__<key>`` per kernel; onnxruntime sessions and bound kernels are cached, never saved.

    The buffers are validated (``check``) before a kernel first reads them: when the layer is built, loaded from
    a file (``sparsifx.load``) or given a state dict. An index out of range is a ``BackendError``, never a read
    outside a buffer."""

    TRANSIENT_ATTRS = ("_sessions", "_fast", "_checked")

    def _store(self, name: str, packed: dict[str, torch.Tensor]) -> None:
        self._keys = {**getattr(self, "_keys", {}), name: tuple((key, f"{name}__{key}") for key in packed)}
        for key, value in packed.items():
            self.register_buffer(f"{name}__{key}", value)

    def _packed(self, name: str) -> dict[str, torch.Tensor]:
        buffers = self._buffers
        return {key: buffers[buf] for key, buf in self._keys[name]}

    def _sessions_cache(self) -> dict:
        return self.__dict__.setdefault("_sessions", {})

    def check(self) -> None:
        """``BackendError`` unless every kernel's packed buffers are valid for this layer's weight shape."""
        rows, cols = self._weight_shape()
        for name in self._keys:
            check_packed(self._packed(name), rows, cols, f"{type(self).__name__} kernel '{name}'")
        bias = self._buffers.get("bias")
        if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (rows,)):
            raise BackendError(f"{type(self).__name__}: bias must be float32 of shape ({rows},)")

    def _checked_buffers(self) -> None:
        if not self.__dict__.get("_checked"):
            self.check()
            self.__dict__.pop("_fast", None)
            self._sessions_cache().clear()
            self.__dict__["_checked"] = True

    def _after_load(self) -> None:
        """Called by ``sparsifx.load`` on a module it rebuilt from a file."""
        self.drop_transient()
        self._checked_buffers()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.requires_grad and torch.is_grad_enabled():
            raise BackendError(
                f"{type(self).__name__} is inference-only; run it under torch.no_grad() or torch.inference_mode()"
            )


@register_leaf_type
class SparseLinear(_PackedMixin, nn.Module):
    """``linear(x, W, b) -> kernel(x, packed(W), b)``, the kernel chosen by the number of rows of ``x``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: Sequence[tuple[int | None, str]]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.plan = _check_plan(plan)
        for name in dict.fromkeys(k for _, k in self.plan):
            self._store(name, get_kernel(name).pack(weight.detach().float()))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def kernel_for(self, rows: int) -> str:
        for bound, name in self.plan:
            if bound is None or rows <= bound:
                return name
        raise AssertionError("unreachable: plans end unbounded")  # pragma: no cover

    def _fast_path(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> kernel_for(rows)(x)`` with every kernel bound to its buffers: the dispatch of ``forward`` without
        its lookups (tens of microseconds per call, as much as a cache-cold 1024x1024 product takes at batch 1)."""
        steps = [
            (math.inf if bound is None else bound, BINDERS.get(name, _bind_generic)(self, name))
            for bound, name in self.plan
        ]
        if len(steps) == 1:
            return steps[0][1]

        def run(x: torch.Tensor) -> torch.Tensor:
            rows = x.shape[0]
            for bound, fn in steps:
                if rows <= bound:
                    return fn(x)
            raise AssertionError("unreachable: plans end unbounded")  # pragma: no cover

        return run

    def _weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _session(self, name: str):
        sessions = self._sessions_cache()
        if name not in sessions:
            sessions[name] = get_kernel(name).session(self._packed(name)["weight"], self.bias)
        return sessions[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._checked_buffers()
        if x.dim() == 2 and x.dtype is torch.float32 and not x.requires_grad:
            fast = self.__dict__.get("_fast")
            if fast is None:
                fast = self.__dict__["_fast"] = self._fast_path()
            return fast(x)
        if x.requires_grad:
            self._check_input(x)
        if x.dtype != torch.float32:
            raise BackendError(f"SparseLinear computes in float32; got a {x.dtype} input")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        name = self.kernel_for(x2.shape[0])
        kernel, packed = SPARSE_KERNELS.get(name), self._packed(name)  # availability checked at construction
        if name == "dense_ort":
            y = kernel.linear(x2, packed, self.bias, session=self._session(name))
        else:
            y = kernel.linear(x2, packed, self.bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plan = ", ".join(f"{'rows<=' + str(b) if b else 'else'}: {k}" for b, k in self.plan)
        return f"in_features={self.in_features}, out_features={self.out_features}, plan=[{plan}]"


def _bind_generic(m: SparseLinear, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    kernel, packed, bias = get_kernel(name), m._packed(name), m.bias
    return lambda x: kernel.linear(x, packed, bias)


def _bind_csr_tiled(m: SparseLinear, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from . import cpp_kernel

    linear, p, bias = cpp_kernel.load().linear, m._packed(name), m.bias
    rowptr, col, val = p["rowptr"], p["col"], p["val"]
    return lambda x: linear(rowptr, col, val, x, bias)


def _bind_dense_ort(m: SparseLinear, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    kernel, packed, bias = get_kernel(name), m._packed(name), m.bias
    return lambda x: kernel.linear(x, packed, bias, session=m._session(name))  # session built on first use


# kernel name -> ``(layer, name) -> x -> y`` bound to the layer's buffers; other kernels use ``_bind_generic``
BINDERS: dict[str, Callable[[SparseLinear, str], Callable[[torch.Tensor], torch.Tensor]]] = {
    "csr_tiled": _bind_csr_tiled,
    "dense_ort": _bind_dense_ort,
}


@register_leaf_type
class SparseConv2d(_PackedMixin, nn.Module):
    """``conv2d(x, W) -> fold(kernel(unfold(x), packed(W.view(out, -1))))`` for ``groups == 1``."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, kernel: str):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise BackendError(
                f"SparseConv2d needs groups=1, zero padding given as numbers; got groups={conv.groups}, "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.kernel = kernel
        if not get_kernel(kernel).supports_conv:
            raise BackendError(f"kernel '{kernel}' does not run convolutions")
        self._store(kernel, get_kernel(kernel).pack(weight.detach().float().reshape(self.out_channels, -1)))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())

    def _weight_shape(self) -> tuple[int, int]:
        return self.out_channels, self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding == (0, 0)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return conv_output_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        self._checked_buffers()
        if x.dtype != torch.float32:
            raise BackendError(f"SparseConv2d computes in float32; got a {x.dtype} input")
        n, _, h, w = x.shape
        ho, wo = self.out_size(h, w)
        kernel, packed = SPARSE_KERNELS.get(self.kernel), self._packed(self.kernel)
        if self.pointwise:
            xs = x if self.stride == (1, 1) else x[:, :, :: self.stride[0], :: self.stride[1]]
            y = kernel.matmul_cols(xs.reshape(n, self.in_channels, ho * wo).contiguous(), packed, self.bias)
            return y.reshape(n, self.out_channels, ho, wo)
        # im2col a few samples at a time so that the unfolded block stays in cache (about UNFOLD_BYTES)
        per_sample = self.in_channels * self.kernel_size[0] * self.kernel_size[1] * ho * wo * 4
        step = max(1, UNFOLD_BYTES // per_sample)
        outs = [
            kernel.matmul_cols(
                F.unfold(x[i : i + step], self.kernel_size, self.dilation, self.padding, self.stride).contiguous(),
                packed,
                self.bias,
            )
            for i in range(0, n, step)
        ]
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y.reshape(n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, kernel={self.kernel}"
        )


def check_packed(packed: dict[str, torch.Tensor], rows: int, cols: int, who: str) -> None:
    """Validate one kernel's packed buffers for a ``[rows, cols]`` weight: a dense ``weight``, or CSR ``rowptr`` /
    ``col`` / ``val`` (``col`` int16 holds uint16 bits)."""

    def fail(why: str):
        raise BackendError(f"{who}: invalid packed weight: {why}")

    if "weight" in packed:
        w = packed["weight"]
        if w.dtype != torch.float32 or tuple(w.shape) != (rows, cols):
            fail(f"dense weight must be float32 of shape ({rows}, {cols})")
        return
    rowptr, col, val = packed.get("rowptr"), packed.get("col"), packed.get("val")
    if any(not isinstance(t, torch.Tensor) or t.dim() != 1 for t in (rowptr, col, val)):
        fail("rowptr, col and val must be 1-D tensors")
    if (
        rowptr.dtype != torch.int64
        or val.dtype != torch.float32
        or col.dtype not in (torch.int16, torch.int32, torch.int64)
    ):
        fail("rowptr int64, col int16/int32/int64, val float32")
    nnz = val.numel()
    if rowptr.numel() != rows + 1 or col.numel() != nnz:
        fail(f"sizes: rowptr {rowptr.numel()} (want {rows + 1}), col {col.numel()}, val {nnz}")
    if not rowptr_is_valid(rowptr, nnz):
        fail("rowptr must rise from 0 to the number of non-zeros")
    c = col.to(torch.int32) & 0xFFFF if col.dtype == torch.int16 else col.long()
    if nnz and (int(c.min()) < 0 or int(c.max()) >= cols):
        fail(f"column index outside [0, {cols})")


def density(weight: torch.Tensor) -> float:
    return float(weight.count_nonzero()) / max(1, weight.numel())
