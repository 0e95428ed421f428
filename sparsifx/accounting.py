"""Training cost accounting shared by SWAT, the DST methods and the benchmarks.

Memory kept for backward: ``saved_tensor_bytes(model, inputs, loss_fn)`` runs one training forward
(and the loss) under ``torch.autograd.graph.saved_tensors_hooks`` and sums the bytes of every distinct
storage that autograd keeps for backward. Each storage counts once (a tensor saved by two ops, or
two views of one buffer, is one buffer: deduplicated by ``untyped_storage().data_ptr()``); the
model's own parameters and buffers are left out (they exist anyway) but any derived copy of them (a
masked or Top-K weight saved for backward) counts, and so do the inputs a layer saves.

Training FLOPs: ``training_flops(model, inputs)`` = Σ over Conv/Linear layers of
``2·MACs·(d_fwd + d_gin + d_gw)`` with each layer's densities: SWAT layers (forward W sparse,
input-grad W sparse, weight-grad activations sparse) report ``training_densities()``, masked layers
use their mask density in all three (``dense_grad_every=ΔT`` amortises RigL's dense weight gradient
``d_gw = d + (1-d)/ΔT``), other layers are dense. Norms, activations and pooling are not counted.

For a benchmark row use ``training_cost(model, dense_model, inputs, loss_fn)`` → ``TrainingCost``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .masking import is_masked
from .module_utils import preserve_training_flags

LossFn = Callable[[Any], torch.Tensor]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _default_loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, (tuple, list)):
        return sum(_default_loss(o) for o in out)
    if isinstance(out, dict):
        return sum(_default_loss(o) for o in out.values())
    raise TypeError(f"cannot reduce model output of type {type(out).__name__}; pass loss_fn")


def saved_storages(model: nn.Module, inputs: Sequence[Any], loss_fn: LossFn | None = None) -> dict[int, int]:
    """``{storage data_ptr: nbytes}`` kept for backward by one training forward + loss (parameters excluded)."""
    own = {_storage(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            ptr, nbytes = _storage(t)
            if ptr not in own and nbytes:
                seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
        loss = (loss_fn or _default_loss)(out)
    del out, loss  # the graph (and the saved tensors) is freed here
    return seen


def saved_tensor_bytes(model: nn.Module, inputs: Sequence[Any], loss_fn: LossFn | None = None) -> int:
    """Bytes autograd keeps for backward in one training step of ``model`` (see the module docstring).

    ``loss_fn(output) -> scalar`` (default: sum of the outputs). The model is run as it is (call
    ``model.train()`` first for training-mode numbers); SWAT layers advance their step counter by one.
    """
    return sum(saved_storages(model, inputs, loss_fn).values())


# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFlops:
    """Dense forward FLOPs of one layer (``2·MACs`` per call, summed over calls) and the three densities."""
    name: str
    forward_flops: float
    d_forward: float = 1.0
    d_grad_input: float = 1.0
    d_grad_weight: float = 1.0

    @property
    def training(self) -> float:
        return self.forward_flops * (self.d_forward + self.d_grad_input + self.d_grad_weight)

    @property
    def dense_training(self) -> float:
        return 3.0 * self.forward_flops


def layer_densities(module: nn.Module, dense_grad_every: int | None = None) -> tuple[float, float, float]:
    """(forward, input-grad, weight-grad) densities this layer really computes with."""
    if hasattr(module, "training_densities"):
        return tuple(module.training_densities())
    if is_masked(module):
        d = float(module.mask.count_nonzero()) / max(1, module.mask.numel())
        dw = d + (1.0 - d) / dense_grad_every if dense_grad_every else d
        return d, d, dw
    return 1.0, 1.0, 1.0


def layer_flops(model: nn.Module, inputs: Sequence[Any], dense_grad_every: int | None = None) -> list[LayerFlops]:
    """Per Conv/Linear layer forward FLOPs (measured shapes of one forward) and densities."""
    from sparsifx.passes.training.flops import macs_rule  # the MAC rules registry (one per layer type)
    macs: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        rule = macs_rule(module) if name else None
        if rule is not None:
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name, rule=rule: macs.__setitem__(name, macs.get(name, 0.0) + rule(m, o))))
    try:
        with torch.no_grad(), preserve_training_flags(model):
            model.eval()
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return [LayerFlops(n, 2.0 * m, *layer_densities(model.get_submodule(n), dense_grad_every)) for n, m in macs.items()]


@dataclass(frozen=True)
class TrainingFlops:
    training: float
    dense_training: float
    per_layer: tuple[LayerFlops, ...]

    @property
    def ratio(self) -> float:
        return self.training / self.dense_training if self.dense_training else float("nan")


def training_flops(model: nn.Module, inputs: Sequence[Any], dense_grad_every: int | None = None) -> TrainingFlops:
    """Forward + backward FLOPs of one training step on ``inputs`` counting each layer's real sparsity."""
    layers = layer_flops(model, inputs, dense_grad_every)
    return TrainingFlops(sum(lf.training for lf in layers), sum(lf.dense_training for lf in layers), tuple(layers))


@dataclass(frozen=True)
class TrainingCost:
    """What one benchmark row needs: FLOP and saved-memory ratios against the dense model."""
    flops: float
    dense_flops: float
    saved_bytes: int
    dense_saved_bytes: int

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else float("nan")

    @property
    def saved_bytes_ratio(self) -> float:
        return self.saved_bytes / self.dense_saved_bytes if self.dense_saved_bytes else float("nan")


def training_cost(model: nn.Module, dense_model: nn.Module, inputs: Sequence[Any], loss_fn: LossFn | None = None,
                  dense_grad_every: int | None = None) -> TrainingCost:
    """``TrainingCost`` of ``model`` against ``dense_model`` (the same network without sparsification)."""
    flops = training_flops(model, inputs, dense_grad_every)
    return TrainingCost(flops.training, flops.dense_training, saved_tensor_bytes(model, inputs, loss_fn),
                        saved_tensor_bytes(dense_model, inputs, loss_fn))
