"""Pass ``nm``: N:M semi-structured masks (2:4 by default) chosen by weight magnitude."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx import validate
from sparsifx.errors import PassError
from sparsifx.masking import effective_weight, get_mask, set_mask
from sparsifx.meta_keys import REPORT_EXTRA
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection

log = logging.getLogger(__name__)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """A 0/1 mask keeping the ``n`` largest-magnitude weights of every ``m`` consecutive ones along the input
    dimension (``weight.reshape(out, -1)``, i.e. ``in_channels * kh * kw`` for convolutions)."""
    w2 = weight.detach().reshape(weight.shape[0], -1)
    if w2.shape[1] % m:
        raise PassError(f"input dimension {w2.shape[1]} is not a multiple of m={m}")
    groups = w2.abs().reshape(-1, m)
    keep = groups.topk(n, dim=1).indices
    mask = torch.zeros_like(groups, dtype=weight.dtype).scatter_(1, keep, 1.0)
    return mask.reshape(weight.shape)


def is_nm(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` along the input dimension has exactly ``n`` non-zeros."""
    groups = (mask.reshape(mask.shape[0], -1) != 0).reshape(-1, m)
    return bool((groups.sum(1) == n).all())


@register_pass("nm")
class NMSparsity(PassBase):
    """``layer(x, W) -> masked_layer(x, W * nm_mask(|W|))``: exactly ``n`` of every ``m`` weights kept.

    Parameters: ``n`` (2), ``m`` (4), ``semi_structured`` (also lower CUDA fp16/bf16 Linear layers to
    ``torch.sparse.to_sparse_semi_structured``; needs a CUDA device), ``selection`` (default Linear, Conv2d).
    Layers whose input dimension is not a multiple of ``m`` are left dense, logged, and listed in
    ``gm.meta["report_extra"][layer]["nm"]``.
    """

    in_place = True
    layer_params = ("n", "m")

    def __init__(
        self, *, n: int = 2, m: int = 4, semi_structured: bool = False, selection: LayerSelection | None = None
    ):
        self.m = validate.integer("m", m, 2)
        self.n = validate.integer("n", n, 1, self.m - 1)
        self.semi_structured = validate.boolean("semi_structured", semi_structured)
        self.selection = (selection or LayerSelection()).with_defaults(("Conv2d", "Linear"))

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        report = gm.meta.setdefault(REPORT_EXTRA, {})
        for name, module in list(self.selection.layers(gm)):
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            n = validate.integer(f"by_name.{name}.n", self.selection.param(name, module, "n", self.n), 1)
            m = validate.integer(f"by_name.{name}.m", self.selection.param(name, module, "m", self.m), n + 1)
            fan_in = module.weight[0].numel()
            if fan_in % m:
                log.warning("nm: layer '%s' has input dimension %d, not a multiple of %d; left dense", name, fan_in, m)
                report.setdefault(name, {})["nm"] = f"skipped (input dim {fan_in} % {m} != 0)"
                continue
            mask = nm_mask(effective_weight(module), n, m)
            old = get_mask(module)
            if old is None or not torch.equal(old, mask):
                set_mask(gm, name, mask)
                modified = True
            report.setdefault(name, {})["nm"] = f"{n}:{m}"
        if self.semi_structured:
            from sparsifx.backends.semi_structured import lower_semi_structured

            modified |= lower_semi_structured(gm, self.selection)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
