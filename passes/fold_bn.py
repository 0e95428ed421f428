"""Pass ``fold_bn``: fold an eval-mode BatchNorm into the Conv/Linear that feeds it (deployment)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx.masking import is_masked
from sparsifx.meta_keys import TENSOR_META
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import Registry, register_pass, type_registry_lookup

log = logging.getLogger(__name__)

# producer class -> BatchNorm class it may be folded with (masked layers are subclasses and match too)
FOLDABLE: Registry[tuple[type, ...]] = Registry("foldable producer")
for _producer, _bn in (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
):
    FOLDABLE.register(_producer, (_bn,))


@dataclass(frozen=True)
class _Pair:
    producer: fx.Node
    bn: fx.Node


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _bn_types(module: nn.Module | None) -> tuple[type, ...]:
    return type_registry_lookup(FOLDABLE, module) or ()


def _used_once(gm: fx.GraphModule, name: str) -> bool:
    """True when ``name`` is called by exactly one node and no node reads its attributes."""
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    reads = any(n.op == "get_attr" and str(n.target).startswith(name + ".") for n in gm.graph.nodes)
    return calls == 1 and not reads


def _why_not(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Reason the BatchNorm ``node`` cannot be folded into its input, or None if it can."""
    bn = _module(gm, node)
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or len(node.args) != 1 or node.kwargs:
        return "unexpected call signature"
    producer = _module(gm, src)
    if not isinstance(bn, _bn_types(producer)):
        return "input is not a matching Conv/Linear layer"
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm has no running statistics (eval uses batch statistics)"
    out_features = producer.weight.shape[0]
    if bn.num_features != out_features:
        return f"BatchNorm has {bn.num_features} features, layer has {out_features} outputs"
    if len(src.users) != 1:
        return "the layer's output has other users"
    if not _used_once(gm, src.target):
        return "the layer is shared (called more than once or read by attribute)"
    if isinstance(producer, nn.Linear):
        meta = src.meta.get(TENSOR_META)
        if meta is None or len(getattr(meta, "shape", ())) != 2:
            return "Linear+BatchNorm1d folds only with a recorded 2-D output shape (N, features)"
    return None


def _folded(producer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``producer`` computing ``bn(producer(x))`` in eval semantics."""
    new = copy.deepcopy(producer)
    w = producer.weight.detach()
    out = w.shape[0]
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(out, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(out, dtype=torch.float64)
    scale = gamma / std
    bias = producer.bias.detach().double() if producer.bias is not None else torch.zeros(out, dtype=torch.float64)
    new_bias = (bias - bn.running_mean.detach().double()) * scale + beta
    shape = (out,) + (1,) * (w.dim() - 1)
    with torch.no_grad():
        new.weight.copy_((w.double() * scale.view(shape)).to(w.dtype))
    new.bias = nn.Parameter(new_bias.to(dtype=w.dtype, device=w.device), requires_grad=new.weight.requires_grad)
    return new


def _set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


@register_pass("fold_bn")
class FoldBatchNorm(PassBase):
    """``bn(conv(x)) -> conv'(x)`` with ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β`` (BatchNorm in eval mode).

    Folds Conv1d/2d/3d + BatchNorm1d/2d/3d and Linear + BatchNorm1d (2-D output only) where the
    layer's output feeds only the BatchNorm and the layer is not shared. The BatchNorm node is removed
    (and its module, once unused). Masked layers stay masked: folding scales whole output channels, so
    ``W'·M = (W·M)·γ/σ`` and the mask stays valid. The folded layer is a fresh copy, so modules shared
    with another model are never changed. This is a deployment pass: it preserves eval-mode outputs,
    while training mode (batch statistics) is no longer what it was. No parameters.
    """

    in_place = True
    preserves_semantics = True

    def __init__(self) -> None:
        pass

    def _pairs(self, gm: fx.GraphModule) -> list[_Pair]:
        pairs = []
        for node in gm.graph.nodes:
            if not isinstance(_module(gm, node), nn.modules.batchnorm._BatchNorm):
                continue
            reason = _why_not(gm, node)
            if reason is None:
                pairs.append(_Pair(node.args[0], node))
            else:
                log.info("fold_bn: not folding %s: %s", node.target, reason)
        return pairs

    def call(self, gm: fx.GraphModule) -> PassResult:
        pairs = self._pairs(gm)
        for pair in pairs:
            producer = _module(gm, pair.producer)
            folded = _folded(producer, _module(gm, pair.bn))
            _set_module(gm, pair.producer.target, folded)
            pair.bn.replace_all_uses_with(pair.producer)
            bn_name = pair.bn.target
            gm.graph.erase_node(pair.bn)
            if not any(n.op == "call_module" and n.target == bn_name for n in gm.graph.nodes):
                gm.delete_submodule(bn_name)
            log.debug(
                "fold_bn: folded %s into %s%s", bn_name, pair.producer.target, " (masked)" if is_masked(folded) else ""
            )
        if pairs:
            gm.recompile()
        return PassResult(gm, bool(pairs))
