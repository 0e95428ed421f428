"""Pass ``swat_finalize``: turn a SWAT-trained model back into plain layers for export / compaction.

``swat_conv(x, W, k) -> conv(x, W ⊙ M)`` with ``M`` the final hard prune to the layer's sparsity
(§1.2 "the best checkpoint is finally hard-pruned to per-layer sparsity"): exactly
``ceil((1-s)·numel)`` weights by magnitude (structured layers: exactly ``ceil((1-s)·out·in)`` kernels by
L1 norm; ties broken by index). ``masked=True`` keeps a ``Masked*`` layer with the dense weights and
the mask instead of baking ``W ⊙ M``. ``LeanReLU``/``LeanMaxPool2d`` go back to ``nn.ReLU``/
``nn.MaxPool2d`` (identical forward). The SWAT controller is removed.
Note: the final mask is exact Top-K of the current weights, which can differ slightly from the
stale-threshold mask of the last training step.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx import validate
from sparsifx.masking import set_mask
from sparsifx.meta_keys import SPARSE_CONTROLLER, SWAT_STATE
from sparsifx.module_utils import set_submodule, swap_class
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass

from . import topk
from .swat_control import SWATController
from .swat_layers import SWAT_DENSE_TYPES, LeanMaxPool2d, LeanReLU, swat_layers


@torch.no_grad()
def final_mask(layer: nn.Module) -> torch.Tensor:
    """The hard-prune mask (same shape as the weight) of a SWAT layer at its current sparsity."""
    w = layer.weight.detach()
    if layer.swat.structured:
        kernels, _ = topk.exact_mask(topk.kernel_scores(w), layer.keep_weights())
        return kernels.view(*kernels.shape, *([1] * (w.dim() - 2))).expand_as(w).clone()
    mask, _ = topk.exact_mask(w.abs(), layer.keep_weights())
    return mask


@register_pass("swat_finalize")
class SWATFinalize(PassBase):
    """``swat_conv(x, W, k) -> conv(x, W ⊙ M_final)``; lean ReLU/MaxPool back to torch's (module docstring)."""

    in_place = True

    def __init__(self, *, masked: bool = False):
        self.masked = validate.boolean("masked", masked)

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for name, layer in list(swat_layers(gm)):
            mask = final_mask(layer)
            dense = swap_class(layer, SWAT_DENSE_TYPES[type(layer)])
            for key in ("thr_w", "thr_a", "step"):
                dense._buffers.pop(key, None)
            for key in ("swat", "sparsity"):
                dense.__dict__.pop(key, None)
            set_submodule(gm, name, dense)
            if self.masked:
                set_mask(gm, name, mask)
            else:
                dense.weight.data.mul_(mask)
            modified = True
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                plain = {LeanReLU: nn.ReLU, LeanMaxPool2d: nn.MaxPool2d}.get(type(module))
                if plain is not None:
                    set_submodule(gm, node.target, swap_class(module, plain))
                    modified = True
        if isinstance(gm.meta.get(SPARSE_CONTROLLER), SWATController):
            gm.meta[SPARSE_CONTROLLER].detach()
            del gm.meta[SPARSE_CONTROLLER]
        if modified:
            gm.meta.pop(SWAT_STATE, None)
            gm.recompile()
        return PassResult(gm, modified)
