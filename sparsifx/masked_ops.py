"""Memory-lean training ops for masked layers: ``linear/conv(x, W*M)`` that recompute ``W*M`` in backward.

Plain autograd of ``F.linear(x, weight * mask)`` saves the product ``weight * mask`` (a new dense-size
tensor per layer) for the input gradient. ``MaskedLinearFn`` / ``MaskedConvFn`` save only the input,
the weight parameter and the mask (tensors that exist anyway) and recompute ``W_eff = weight * mask``
in backward:

    grad_input  = grad_out ⋆ W_eff
    grad_weight = grad_W_eff * mask      (or grad_W_eff when ``dense_grad``: straight-through)
    grad_bias   = Σ grad_out

Under autocast the forward computes in the autocast dtype; backward casts the saved tensors to the
gradient's dtype and returns gradients in each input's own dtype (as autocast's cast ops would).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


class MaskedLinearFn(torch.autograd.Function):
    """``F.linear(x, weight * mask, bias)``; saves ``(x, weight, mask)``, not the product."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, dense_grad: bool):
        ctx.save_for_backward(x, weight, mask)
        ctx.dense_grad = dense_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight * mask, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, _, need_b, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_x:
            w_eff = (weight * mask).to(grad_out.dtype)
            grad_x = grad_out.matmul(w_eff).to(x.dtype)
        if need_w:
            grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1]).to(grad_out.dtype)).to(weight.dtype)
            if not ctx.dense_grad:
                grad_w = grad_w * mask
        if need_b and ctx.bias_dtype is not None:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, None, grad_b, None


class MaskedConvFn(torch.autograd.Function):
    """``convolution(x, weight * mask, bias, stride, padding, dilation, groups)`` (numeric padding only)."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        mask,
        bias,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        dense_grad: bool,
    ):
        ctx.save_for_backward(x, weight, mask)
        ctx.conf = (list(stride), list(padding), list(dilation), groups)
        ctx.dense_grad = dense_grad
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        n = weight.dim() - 2
        return torch.convolution(
            x, weight * mask, bias, list(stride), list(padding), list(dilation), False, [0] * n, groups
        )

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        stride, padding, dilation, groups = ctx.conf
        n = weight.dim() - 2
        w_eff = (weight * mask).to(grad_out.dtype)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            x.to(grad_out.dtype),
            w_eff,
            ctx.bias_sizes,
            stride,
            padding,
            dilation,
            False,
            [0] * n,
            groups,
            [need_x, need_w, need_b and ctx.bias_sizes is not None],
        )
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
            if not ctx.dense_grad:
                grad_w = grad_w * mask
        return grad_x, grad_w, None, grad_b, None, None, None, None, None


def use_recompute(x: object, weight: torch.Tensor) -> bool:
    """True in eager training (grad enabled, something needs a gradient) and not while tracing/exporting."""
    if not (isinstance(x, torch.Tensor) and torch.is_grad_enabled()):
        return False
    if not (weight.requires_grad or x.requires_grad):
        return False
    return not (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )
