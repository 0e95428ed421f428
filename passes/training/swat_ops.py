"""Autograd Functions behind SWAT layers and their memory-lean neighbours.

* ``SWATFunction``: ``y = op(x, W_s, b)`` with dense ``x``; saves ``x_s = TopK(x)`` *compressed*
  (packed 1-bit mask + the kept values) plus ``W`` (the parameter itself: no copy) and the weight
  mask in its cheapest exact form (a float threshold, packed bits, or a per-kernel bool mask);
  backward: ``gx = op_bwd_input(gy, W_s)``, ``gW = op_bwd_weight(gy, x_s)`` (dense-shaped), ``gb = Σ gy``.
* ``LeanReLUFunction``: ReLU whose backward keeps a packed sign bitmask (1 bit/element) instead of
  the dense output that ``torch.relu`` saves.
* ``LeanMaxPoolFunction``: max-pool that saves int32 indices only (``F.max_pool2d`` saves the dense
  input and int64 indices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable

from .kernels import NumpyOps, TorchOps, ops_for


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into uint8 (bit i of byte j = element 8j+i of the flattened mask)."""
    return (NumpyOps if mask.device.type == "cpu" else TorchOps).pack_bits(mask)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``pack_bits``: a bool tensor of ``shape``."""
    return (NumpyOps if packed.device.type == "cpu" else TorchOps).unpack_bits(packed, shape)


def compress(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * mask`` stored as (packed mask, kept values)."""
    return pack_bits(mask), ops_for(x).select(x, mask)


def decompress(bits: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    return ops_for(values).scatter(values, unpack_bits(bits, shape))


# weight masks in their cheapest exact encodings: (kind, data) -> W_s rebuilt in backward
def weight_from_threshold(weight: torch.Tensor, thr: float) -> torch.Tensor:
    """``W · (|W| >= thr)`` in one fused pass: ``hardshrink`` keeps ``|W| > λ``, and with ``λ`` the largest value
    of W's dtype below ``thr`` that keeps exactly the entries with ``|W| >= thr``."""
    w = weight.detach()
    if not thr > 0:  # every entry kept (thr <= 0), or a NaN threshold: leave it to the exact path
        ops = ops_for(w)
        return ops.apply_mask(w, ops.abs_ge(w, thr))
    return torch.nn.functional.hardshrink(w, below(thr, w.dtype))


def below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value`` (> 0) rounded to ``dtype``, as ``|W| >= value`` compares:
    then ``x > below(v)`` iff ``x >= v`` for every ``x`` of that dtype."""
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.zeros((), dtype=dtype)))


def weight_from_bits(weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    return ops_for(weight).apply_mask(weight, unpack_bits(bits, weight.shape))


def weight_from_kernels(weight: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    return ops_for(weight).apply_mask(weight, kernels.view(*kernels.shape, *([1] * (weight.dim() - kernels.dim()))))


WEIGHT_DECODERS: dict[str, Callable] = {
    "threshold": weight_from_threshold,
    "bits": weight_from_bits,
    "kernel": weight_from_kernels,
}


@dataclass(frozen=True)
class WeightMask:
    """How the forward weight was sparsified: ``kind`` in ``WEIGHT_DECODERS`` and its data (a float
    threshold, packed bits, or a per-kernel bool mask)."""

    kind: str
    data: Any

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return WEIGHT_DECODERS[self.kind](weight, self.data)


# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearOp:
    def forward(self, x, w, b):
        return torch.nn.functional.linear(x, w, b)

    def backward(self, gy, x_s, x_shape, w_s, needs):
        gx = gy.matmul(w_s) if needs[0] else None
        gy2 = gy.reshape(-1, gy.shape[-1])
        gw = gy2.t().mm(x_s.reshape(-1, x_s.shape[-1])) if needs[1] else None
        gb = gy2.sum(0) if needs[2] else None
        return gx, gw, gb


@dataclass(frozen=True)
class ConvOp:
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def forward(self, x, w, b):
        zeros = [0] * len(self.stride)
        return torch.ops.aten.convolution(
            x, w, b, list(self.stride), list(self.padding), list(self.dilation), False, zeros, self.groups
        )

    def backward(self, gy, x_s, x_shape, w_s, needs):
        if x_s is None:  # only the input grad is needed: a zero-stride stand-in gives the shape
            x_s = gy.new_zeros(()).expand(x_shape)
        zeros = [0] * len(self.stride)
        bias_sizes = [w_s.shape[0]] if needs[2] else None
        return torch.ops.aten.convolution_backward(
            gy,
            x_s,
            w_s,
            bias_sizes,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            zeros,
            self.groups,
            list(needs),
        )


class SWATFunction(torch.autograd.Function):
    """``(x, W, b) -> op(x, W_s, b)`` with ``W_s = wmask.apply(W)`` given precomputed (no gradient flows to it);
    ``act_mask(x)`` picks the Top-K activations to save."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_s, wmask: WeightMask, act_mask: Callable, op):
        y = op.forward(x, w_s, bias)
        ctx.op, ctx.kind, ctx.x_shape, ctx.has_bias = op, wmask.kind, x.shape, bias is not None
        tensors = [weight]
        if isinstance(wmask.data, torch.Tensor):
            tensors.append(wmask.data)
        else:
            ctx.wdata = wmask.data
        ctx.n_w = len(tensors)
        if ctx.needs_input_grad[1]:
            tensors.extend(compress(x, act_mask(x)))
        ctx.save_for_backward(*tensors)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        saved = ctx.saved_tensors
        weight, wdata = saved[0], (saved[1] if ctx.n_w == 2 else ctx.wdata)
        w_s = WEIGHT_DECODERS[ctx.kind](weight, wdata)
        act = saved[ctx.n_w :]
        x_s = decompress(act[0], act[1], ctx.x_shape) if act else None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        gx, gw, gb = ctx.op.backward(gy.contiguous(), x_s, ctx.x_shape, w_s, needs)
        return gx, gw, gb, None, None, None, None


class LeanReLUFunction(torch.autograd.Function):
    """ReLU saving a packed ``y > 0`` bitmask (1 bit/element) for backward."""

    @staticmethod
    def forward(ctx, x, inplace: bool):
        if inplace:
            y = x.clamp_min_(0)
            ctx.mark_dirty(x)
        else:
            y = x.clamp_min(0)
        ctx.shape = y.shape
        ctx.save_for_backward(pack_bits(ops_for(y).positive(y)))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        (bits,) = ctx.saved_tensors
        return ops_for(gy).apply_mask(gy, unpack_bits(bits, ctx.shape)), None


class LeanMaxPoolFunction(torch.autograd.Function):
    """2-D max-pool saving int32 plane indices only (the input is needed for its shape alone). A uint8
    in-window offset would be 4x smaller but its integer division costs more than the pool itself on CPU."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.x_shape = x.shape
        ctx.save_for_backward(idx.to(torch.int32) if x.shape[-1] * x.shape[-2] < 2**31 else idx)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        (idx,) = ctx.saved_tensors
        proxy = gy.new_zeros(()).expand(ctx.x_shape)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(gy.contiguous(), proxy, *ctx.args, idx.long())
        return gx, None, None, None, None, None
