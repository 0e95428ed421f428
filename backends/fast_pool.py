"""``FastMaxPool2d``: ``nn.MaxPool2d`` on float32 NCHW through the C++ kernel of ``backends/cpp_kernel.py``.

torch's NCHW max pooling is slow on one CPU thread at batch 1 (resnet50's stem pool: about 7 ms, against 0.4 ms
here), which matters once the convolutions around it are sparse. Floor mode, dilation 1, no indices only
(``supported``); anything else keeps ``nn.MaxPool2d``. Inference only; a tracing leaf.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from sparsifx.tracing import register_leaf_type

from . import cpp_kernel


def supported(pool: nn.Module) -> bool:
    return (
        type(pool) is nn.MaxPool2d and not pool.ceil_mode and not pool.return_indices and _pair(pool.dilation) == (1, 1)
    )


@register_leaf_type
class FastMaxPool2d(nn.Module):
    """``max_pool2d(x, kernel_size, stride, padding)`` in C++ for float32 4-D inputs (others: torch's)."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.kernel_size = _pair(pool.kernel_size)
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.padding = _pair(pool.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or (x.requires_grad and torch.is_grad_enabled()):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return cpp_kernel.load().maxpool(x, *self.kernel_size, *self.stride, *self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
