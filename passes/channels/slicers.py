"""Layer slicers: ``SLICERS`` maps a module type to ``slicer(module, cuts)`` that keeps the indices
``cuts[(tensor_name, dim)]`` of each tensor and updates the layer's size attributes (and groups).
Masked layers (``sparsifx.masking``) slice their ``mask`` with their ``weight``. A type without a
slicer gets ``slice_generic`` (tensors only)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from sparsifx.masking import is_masked
from sparsifx.registry import Registry, type_key, type_registry_lookup

SLICERS: Registry[Callable] = Registry("layer slicer")
Cuts = dict[tuple[str, int], torch.Tensor]


def register_slicer(*types: type) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        for t in types:
            SLICERS.register(t, fn)  # keyed by sparsifx.registry.type_key
        return fn

    return add


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)


def cut(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    t = getattr(module, name)
    set_tensor(module, name, t.detach().index_select(dim, index))
    if name == "weight" and is_masked(module):
        module._buffers["mask"] = module.mask.index_select(dim, index)


def slice_generic(module: nn.Module, cuts: Cuts) -> None:
    out_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    if (
        ("weight", out_dim) in cuts
        and getattr(module, "bias", None) is not None
        and ("bias", 0) not in cuts
        and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    ):
        cuts = {**cuts, ("bias", 0): cuts[("weight", out_dim)]}  # a bias created by constant folding
    for (name, dim), index in sorted(cuts.items(), key=lambda kv: kv[0][1]):  # rows first: less to gather
        cut(module, name, dim, index)


def slice_module(module: nn.Module, cuts: Cuts) -> None:
    (type_registry_lookup(SLICERS, module) or slice_generic)(module, cuts)


@register_slicer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def slice_conv(m: nn.Module, cuts: Cuts) -> None:
    cin, cout, g = m.in_channels, m.out_channels, m.groups
    if 1 < g < cin and cin == cout and ("weight", 0) in cuts:
        out_idx = cuts[("weight", 0)]
        _regroup_identity(m, out_idx)
        cuts = {k: v for k, v in cuts.items() if k != ("weight", 0)}
        if m.bias is not None:
            cuts[("bias", 0)] = out_idx
    slice_generic(m, cuts)
    new_out = m.weight.shape[0]
    if g == 1:
        m.in_channels = m.weight.shape[1]
    elif g == cin and cout % cin == 0:
        m.groups = m.in_channels = new_out // (cout // cin)
    elif cin == cout:
        m.in_channels = new_out
    m.out_channels = new_out


def _regroup_identity(m: nn.Module, out_idx: torch.Tensor) -> None:
    """Grouped conv with in == out coupled per index: keep rows ``out_idx`` and, in each row, the kept
    input indices local to its group (the same count in every group that keeps any); groups that keep
    nothing are dropped."""
    size = m.out_channels // m.groups
    block = out_idx // size
    kept_blocks = torch.unique(block)
    cols = [(out_idx[block == b] - b * size) for b in kept_blocks.tolist()]
    if len({len(c) for c in cols}) != 1:
        raise ValueError(f"grouped conv needs equal kept channels per group, got {sorted({len(c) for c in cols})}")
    local = torch.stack(cols)[torch.searchsorted(kept_blocks, block)]  # (kept out, kept per group)
    m.groups = len(kept_blocks)
    w = m.weight.detach().index_select(0, out_idx)
    index = local.reshape(local.shape + (1,) * (w.ndim - 2)).expand(-1, -1, *w.shape[2:])
    set_tensor(m, "weight", torch.gather(w, 1, index))
    if is_masked(m):
        m._buffers["mask"] = torch.gather(m.mask.index_select(0, out_idx), 1, index)


@register_slicer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def slice_conv_transpose(m: nn.Module, cuts: Cuts) -> None:
    slice_generic(m, cuts)
    m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


@register_slicer(nn.Linear)
def slice_linear(m: nn.Module, cuts: Cuts) -> None:
    slice_generic(m, cuts)
    m.out_features, m.in_features = m.weight.shape


HF_CONV1D = "transformers.pytorch_utils.Conv1D"  # registered by name: transformers is never imported here


def is_hf_conv1d(m: nn.Module) -> bool:
    return any(type_key(c) == HF_CONV1D for c in type(m).__mro__)


def slice_hf_conv1d(m: nn.Module, cuts: Cuts) -> None:
    """transformers' ``Conv1D``: weight ``(nx, nf)``, bias ``(nf,)``."""
    slice_generic(m, cuts)
    m.nx, m.nf = m.weight.shape


SLICERS.register(HF_CONV1D, slice_hf_conv1d)


@register_slicer(nn.modules.batchnorm._NormBase)
def slice_batch_norm(m: nn.Module, cuts: Cuts) -> None:
    slice_generic(m, cuts)
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


@register_slicer(nn.LayerNorm, nn.RMSNorm)
def slice_layer_norm(m: nn.Module, cuts: Cuts) -> None:
    slice_generic(m, cuts)
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@register_slicer(nn.GroupNorm)
def slice_group_norm(m: nn.Module, cuts: Cuts) -> None:
    slice_generic(m, cuts)
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@register_slicer(nn.Embedding)
def slice_embedding(m: nn.Module, cuts: Cuts) -> None:
    slice_generic(m, cuts)
    m.embedding_dim = m.weight.shape[1]
