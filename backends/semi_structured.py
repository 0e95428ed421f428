"""2:4 semi-structured sparse Linear layers on CUDA (``torch.sparse.to_sparse_semi_structured``)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.errors import BackendError
from sparsifx.masking import effective_weight, is_masked
from sparsifx.tracing import register_leaf_type

log = logging.getLogger(__name__)
SEMI_DTYPES = (torch.float16, torch.bfloat16)


@register_leaf_type
class SemiStructuredLinear(nn.Module):
    """``linear(x, W) -> linear(x, to_sparse_semi_structured(W))`` (a 2:4 weight on a CUDA device)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if not weight.is_cuda or weight.dtype not in SEMI_DTYPES:
            raise BackendError(
                f"semi-structured sparsity needs a CUDA fp16/bf16 weight, got {weight.dtype} on {weight.device}"
            )
        from torch.sparse import to_sparse_semi_structured

        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(to_sparse_semi_structured(weight.detach().contiguous()), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 semi-structured"


def lower_semi_structured(gm: torch.fx.GraphModule, selection) -> bool:
    """Replace masked CUDA fp16/bf16 ``Linear`` layers by ``SemiStructuredLinear``; ``BackendError`` on CPU."""
    if not torch.cuda.is_available():
        raise BackendError("semi_structured=True needs a CUDA device (torch.cuda.is_available() is False)")
    changed = False
    for name, module in list(selection.layers(gm)):
        if not (isinstance(module, nn.Linear) and is_masked(module)):
            continue
        weight = effective_weight(module).detach()
        if not weight.is_cuda or weight.dtype not in SEMI_DTYPES:
            raise BackendError(
                f"layer '{name}': semi-structured lowering needs a CUDA fp16/bf16 weight, got "
                f"{weight.dtype} on {weight.device}; call model.half().cuda() first"
            )
        new = SemiStructuredLinear(weight, module.bias)
        parent, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, new)
        changed = True
    return changed
