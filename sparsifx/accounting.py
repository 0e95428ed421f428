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

That is a one-step snapshot. It is exact for dense, static and SET models and for SWAT layers with constant
densities, but not for a method whose weight-gradient density or mask density changes over the run (sparse
momentum: dense weight gradient every step; RigL: dense on update steps up to T_end only; GMP: density falls over
its schedule; CTRE: activation statistics). ``training_flops`` therefore raises ``PreconditionError`` on a model
whose DST controller runs such a method unless ``dense_grad_every`` is given explicitly (the caller then states the
amortisation, e.g. 1 for sparse momentum): use the controller's ``training_flops()``, which charges every step as
it ran. ``MeasuredFlops(model)`` counts SWAT layers' densities as measured at each training forward (threshold
reuse makes them differ from the nominal ``1 - sparsity``).

For a benchmark row use ``training_cost(model, dense_model, inputs, loss_fn)`` → ``TrainingCost``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .analysis.costs import layer_macs_rule as macs_rule  # the one op cost table (sparsifx.analysis.costs)
from .masking import is_masked
from .meta_keys import SPARSE_CONTROLLER
from .module_utils import eval_mode

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
    macs: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        rule = macs_rule(module) if name else None
        if rule is not None:
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name, rule=rule: macs.__setitem__(name, macs.get(name, 0.0) + rule(m, o))
                )
            )
    try:
        with torch.no_grad(), eval_mode(model):
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


# methods whose per-step training FLOPs a mask snapshot does not give (see the module docstring)
SNAPSHOT_INEXACT = frozenset({"sparse_momentum", "rigl", "gmp", "ctre"})


def _controller_method(model: nn.Module) -> str | None:
    inner = getattr(model, "module", model)
    meta = getattr(inner, "meta", None)
    ctrl = meta.get(SPARSE_CONTROLLER) if isinstance(meta, dict) else None
    method = getattr(ctrl, "method", None)
    return None if method is None else str(getattr(method, "label", type(method).__name__)).lower()


def training_flops(model: nn.Module, inputs: Sequence[Any], dense_grad_every: int | None = None) -> TrainingFlops:
    """Forward + backward FLOPs of one training step on ``inputs`` counting each layer's real sparsity.

    Raises ``PreconditionError`` for a model whose DST method's FLOPs vary over the run (``SNAPSHOT_INEXACT``)
    unless ``dense_grad_every`` is given: use ``sparsifx.controller(model).training_flops()`` there."""
    method = _controller_method(model)
    if dense_grad_every is None and method is not None and method.split("/")[0] in SNAPSHOT_INEXACT:
        from .errors import PreconditionError

        raise PreconditionError(
            f"training_flops: a one-step snapshot miscounts {method} (dense weight gradients, "
            "changing density or extra statistics over the run); use the controller's "
            "training_flops() (sparsifx.controller(model).training_flops()), or pass "
            "dense_grad_every explicitly (1 = dense weight gradient every step)"
        )
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


def training_cost(
    model: nn.Module,
    dense_model: nn.Module,
    inputs: Sequence[Any],
    loss_fn: LossFn | None = None,
    dense_grad_every: int | None = None,
) -> TrainingCost:
    """``TrainingCost`` of ``model`` against ``dense_model`` (the same network without sparsification)."""
    flops = training_flops(model, inputs, dense_grad_every)
    return TrainingCost(
        flops.training,
        flops.dense_training,
        saved_tensor_bytes(model, inputs, loss_fn),
        saved_tensor_bytes(dense_model, inputs, loss_fn),
    )


class MeasuredFlops:
    """Training FLOPs with each layer's densities *measured* at every training forward (module hooks).

    SWAT layers: forward/input-grad density = share of ``|W| >= thr_w`` (the threshold the forward used, stale
    or recomputed), weight-grad density = share of the layer input with ``|x| >= max(thr_a, tiny)``; structured
    SWAT layers use their nominal ``training_densities()``. Masked layers: mask density in all three; other layers
    dense. ``theoretical`` = Σ 2·MACs·(d_f + d_gi + d_gw); ``executed`` = 3·2·MACs for every layer (SWAT and
    masked layers multiply zero-filled dense tensors); ``dense`` = 3·2·MACs. Call ``remove()`` when done.
    """

    def __init__(self, model: nn.Module):
        self.theoretical = self.executed = self.dense = 0.0
        self.forwards = 0
        self.density_sum: dict[str, list[float]] = {}
        self._handles = []
        for name, module in model.named_modules():
            rule = macs_rule(module) if name else None
            if rule is not None:
                self._handles.append(module.register_forward_hook(self._hook(name, rule)))

    def _hook(self, name: str, rule):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled()):
                return
            flops = 2.0 * float(rule(module, output))
            dens = self.measured_densities(module, inputs[0])
            self.theoretical += flops * sum(dens)
            self.executed += 3.0 * flops
            self.dense += 3.0 * flops
            acc = self.density_sum.setdefault(name, [0.0, 0.0, 0.0, 0])
            for i, v in enumerate(dens):
                acc[i] += v
            acc[3] += 1

        return hook

    @staticmethod
    @torch.no_grad()
    def measured_densities(module: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
        swat = getattr(module, "swat", None)
        if swat is not None and hasattr(module, "thr_w") and not swat.structured:
            thr_w, thr_a = float(module.thr_w), float(module.thr_a)
            dw = float((module.weight.abs() >= thr_w).float().mean())
            tiny = torch.finfo(x.dtype).tiny
            da = float((x.abs() >= max(thr_a, tiny)).float().mean())
            return dw, dw, da
        return layer_densities(module, None)

    def mean_densities(self) -> dict[str, tuple[float, float, float]]:
        return {n: (a[0] / a[3], a[1] / a[3], a[2] / a[3]) for n, a in self.density_sum.items() if a[3]}

    def summary(self) -> dict[str, float]:
        nan = float("nan")
        return {
            "training_flops": self.theoretical,
            "executed_training_flops": self.executed,
            "dense_training_flops": self.dense,
            "flops_ratio": self.theoretical / self.dense if self.dense else nan,
            "executed_flops_ratio": self.executed / self.dense if self.dense else nan,
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
