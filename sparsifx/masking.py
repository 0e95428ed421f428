"""Weight masks as modules: ``MaskedLinear`` / ``MaskedConv*d`` compute with ``weight * mask``.

A masked layer is a subclass of its dense class (so ``isinstance(m, nn.Conv2d)`` still holds and
other passes keep working), is a tracing leaf, and keeps its qualified name in the graph. With
``dense_grad=True`` the gradient reaching ``weight`` is the dense gradient of the effective weight
(straight-through), which dynamic sparse training methods read for growth.

In eager training the layers run through ``sparsifx.masked_ops`` (``W*M`` recomputed in backward,
so autograd keeps no dense-size product per layer); under no_grad / inference_mode and while
tracing or exporting (jit trace, torch.compile/export, ONNX) they compute ``F.linear/conv(x, W*M)``.
"""

from __future__ import annotations

import sys
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import PassError
from .masked_ops import MaskedConvFn, MaskedLinearFn, use_recompute
from .module_utils import set_submodule, swap_class
from .tracing import register_leaf_type


class MaskedMixin:
    """Shared behaviour of masked layers: a ``mask`` buffer shaped like ``weight``."""

    mask: torch.Tensor
    dense_grad: bool = False

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        if self.dense_grad and torch.is_grad_enabled():
            return w + (w * self.mask - w).detach()
        return w * self.mask

    def extra_repr(self) -> str:
        density = float(self.mask.count_nonzero()) / max(1, self.mask.numel())
        return f"{super().extra_repr()}, density={density:.4f}"


@register_leaf_type
class MaskedLinear(MaskedMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_recompute(x, self.weight):
            return MaskedLinearFn.apply(x, self.weight, self.mask, self.bias, bool(self.dense_grad))
        return F.linear(x, self.effective_weight(), self.bias)


class _MaskedConvMixin(MaskedMixin):
    """``conv(x, W*M)``; padding modes other than zeros and string paddings are applied with
    ``F.pad`` first (as ``nn.Conv*d._conv_forward`` does), so the op sees numeric padding only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_recompute(x, self.weight):
            return self._conv_forward(x, self.effective_weight(), self.bias)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * (self.weight.dim() - 2)
        return MaskedConvFn.apply(
            x,
            self.weight,
            self.mask,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            bool(self.dense_grad),
        )


@register_leaf_type
class MaskedConv1d(_MaskedConvMixin, nn.Conv1d):
    pass


@register_leaf_type
class MaskedConv2d(_MaskedConvMixin, nn.Conv2d):
    pass


@register_leaf_type
class MaskedConv3d(_MaskedConvMixin, nn.Conv3d):
    pass


# dense class -> masked class; the one table to extend for a new layer type
MASKED_TYPES: dict[type, type] = {
    nn.Linear: MaskedLinear,
    nn.Conv1d: MaskedConv1d,
    nn.Conv2d: MaskedConv2d,
    nn.Conv3d: MaskedConv3d,
}
DENSE_TYPES: dict[type, type] = {v: k for k, v in MASKED_TYPES.items()}


class _MaskedHFConv1D(MaskedMixin):
    """transformers' ``Conv1D`` (GPT-2: ``y = x @ W + b``, ``W`` shaped [in, out]) computing with ``W*M``;
    the mask is shaped like ``W``, so sparsity counts over the same [in, out] weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_recompute(x, self.weight):  # F.linear form of the same product: x @ (W*M) = linear(x, (W*M)^T)
            return MaskedLinearFn.apply(x, self.weight.t(), self.mask.t(), self.bias, bool(self.dense_grad))
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.effective_weight()).view(size_out)

    def __repr__(self) -> str:
        return f"MaskedConv1D(nf={self.nf}, nx={self.nx}{MaskedMixin.extra_repr(self)})"


def register_hf_types() -> tuple[type, ...]:
    """Register transformers' layer types once transformers is importable: ``Conv1D`` becomes a tracing leaf
    and maskable (as ``MaskedConv1D``). Returns the dense types registered (empty without transformers).
    transformers is imported here only, never when sparsifx is."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ()
    if Conv1D not in MASKED_TYPES:
        masked = type("MaskedConv1D", (_MaskedHFConv1D, Conv1D), {"__module__": __name__})
        globals()["MaskedConv1D"] = masked  # importable (and picklable) by name once registered
        MASKED_TYPES[Conv1D], DENSE_TYPES[masked] = masked, Conv1D
        register_leaf_type(masked)
        register_leaf_type(Conv1D)
    return (Conv1D,)


def masked_type(cls: type) -> type | None:
    """The masked class for dense class ``cls`` (``None`` if it cannot be masked)."""
    if cls not in MASKED_TYPES and cls.__module__.startswith("transformers."):
        register_hf_types()
    return MASKED_TYPES.get(cls)


if "transformers.pytorch_utils" in sys.modules:  # already loaded by the user: register now, for free
    register_hf_types()


def is_masked(module: nn.Module) -> bool:
    return isinstance(module, MaskedMixin)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    return module.mask if is_masked(module) else None


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with (masked where it is masked)."""
    return module.effective_weight() if is_masked(module) else module.weight


def set_mask(root: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
    """Install ``mask`` on layer ``name`` of ``root`` (swapping in its masked class); returns the layer."""
    module = root.get_submodule(name)
    if not is_masked(module):
        masked_cls = masked_type(type(module))
        if masked_cls is None:
            raise PassError(
                f"layer '{name}' of type {type(module).__name__} cannot be masked; "
                f"maskable types: {', '.join(t.__name__ for t in MASKED_TYPES)}"
            )
        module = swap_class(module, masked_cls)
        module.register_buffer("mask", torch.ones_like(module.weight, dtype=module.weight.dtype))
        set_submodule(root, name, module)
    if tuple(mask.shape) != tuple(module.weight.shape):
        raise PassError(
            f"mask shape {tuple(mask.shape)} does not match weight {tuple(module.weight.shape)} of layer '{name}'"
        )
    module.mask.copy_(mask.to(module.mask.dtype))
    return module


def masked_layers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.named_modules():
        if is_masked(module):
            yield name, module


def bake_masks(root: nn.Module) -> int:
    """Replace every masked layer by its dense class with ``weight *= mask``; returns how many."""
    count = 0
    for name, module in list(masked_layers(root)):
        dense = swap_class(module, DENSE_TYPES[type(module)])
        with torch.no_grad():
            dense.weight.mul_(module.mask)
        del dense._buffers["mask"]
        dense.__dict__.pop("dense_grad", None)
        set_submodule(root, name, dense)
        count += 1
    return count
