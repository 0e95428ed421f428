"""``SWATController``: the training-time side of the ``swat`` pass, stepped with the optimizer.

It follows the protocol of the DST ``SparseController`` (``attach(optimizer, steps_per_epoch=None,
epochs=None, data=None)``, ``detach()``, ``summary()``, ``state_dict()``), so ``sparsifx.attach(model,
opt)`` style code works for SWAT too. For ``unstructured``/``erk``/``structured`` it only counts steps
(the layers keep their own threshold state); for ``momentum`` (SWAT-M, §1.3) after **every**
``optimizer.step()`` it re-allocates the per-layer sparsity from the optimizer's momentum:

``mask_l = |W_l| >= thr_w,l``; ``m_l = mean(|momentum_l|[mask_l])`` (Adam: ``exp_avg/(sqrt(exp_avg_sq)+1e-8)``);
``n_l = ceil(m_l/Σm · D · N_total)``; layers with ``n_l > 0.99·N_l`` become dense and their excess is spread
evenly over the other layers (≤1000 rounds); ``s_l = 1 − n_l/N_l``. As in the reference code, larger mean
momentum gets more non-zeros, not scaled by layer size. The new sparsity takes effect at each layer's
next threshold recompute (every call for Linear, every ``topk_period`` steps for convs).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from sparsifx.errors import PassError, PreconditionError

from .mask_ops import momentum_of

MAX_ROUNDS = 1000
DENSE_CAP = 0.99


def momentum_allocation(mean_momentum: Mapping[str, float], numel: Mapping[str, int], density: float) -> dict[str, int]:
    """Non-zero count per layer, SWAT-M style (see the module docstring)."""
    total_m = sum(mean_momentum.values())
    budget = density * sum(numel.values())
    if total_m <= 0 or not math.isfinite(total_m):
        return {n: math.ceil(density * numel[n]) for n in numel}
    alloc = {n: float(math.ceil(mean_momentum[n] / total_m * budget)) for n in numel}
    dense: set[str] = set()
    for _ in range(MAX_ROUNDS):
        over = [n for n in alloc if n not in dense and alloc[n] > DENSE_CAP * numel[n]]
        if not over:
            break
        excess = sum(alloc[n] - numel[n] for n in over)
        for n in over:
            alloc[n] = float(numel[n])
            dense.add(n)
        free = [n for n in alloc if n not in dense]
        if not free:
            break
        for n in free:
            alloc[n] += excess / len(free)
    return {n: int(min(numel[n], max(0, math.ceil(v)))) for n, v in alloc.items()}


class SWATController:
    """Counts optimizer steps and, for SWAT-M, re-allocates the layer sparsities after each step."""

    def __init__(self, gm: nn.Module, names: Iterable[str], variant: str, sparsity: float):
        self.gm = gm
        self.names = list(names)
        self.variant = variant
        self.sparsity = float(sparsity)
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, Any]] = []
        self._handles: list = []

    @property
    def layers(self) -> dict[str, nn.Module]:
        return {n: self.gm.get_submodule(n) for n in self.names}

    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
        data: Iterable | None = None,
    ) -> "SWATController":
        """Hook ``optimizer``: every ``optimizer.step()`` then also runs ``self.after_step()``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise PreconditionError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.variant == "momentum" and not all(g.get("momentum", 0) or "betas" in g for g in optimizer.param_groups):
            raise PreconditionError(
                "SWAT-M (variant 'momentum') allocates sparsity from the optimizer's momentum: "
                "use SGD with momentum > 0 or an Adam-style optimizer"
            )
        self.detach()
        self.optimizer = optimizer
        self._handles = [optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step())]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def after_step(self) -> None:
        self.step += 1
        if self.variant == "momentum":
            self.reallocate()

    @torch.no_grad()
    def reallocate(self) -> dict[str, float]:
        """SWAT-M: new per-layer sparsities from the optimizer's momentum (needs ``attach`` first)."""
        if self.optimizer is None:
            raise PreconditionError(
                "SWAT-M re-allocates from the optimizer's momentum: call "
                "swat_controller(model).attach(optimizer) before training"
            )
        layers = self.layers
        mean_m, numel = {}, {}
        for name, layer in layers.items():
            if layer.weight not in self.optimizer.state:
                return {n: m.sparsity for n, m in layers.items()}  # no step taken yet
            try:
                mom = momentum_of(self.optimizer, layer.weight).abs()
            except PassError as exc:
                raise PreconditionError(f"SWAT-M (variant 'momentum') reads the optimizer's momentum: {exc}") from exc
            thr = layer.thr_w
            mask = layer.weight.abs() >= thr if not torch.isnan(thr) else torch.ones_like(mom, dtype=torch.bool)
            mean_m[name] = float(mom[mask].mean()) if mask.any() else 0.0
            numel[name] = layer.weight.numel()
        alloc = momentum_allocation(mean_m, numel, 1.0 - self.sparsity)
        out = {}
        for name, layer in layers.items():
            layer.sparsity = out[name] = 1.0 - alloc[name] / numel[name]
        self.history.append({"step": self.step, "sparsity": dict(out)})
        return out

    def summary(self) -> dict[str, Any]:
        layers = self.layers
        total = sum(m.weight.numel() for m in layers.values())
        kept = sum((1 - m.sparsity) * m.weight.numel() for m in layers.values())
        return {
            "method": f"swat/{self.variant}",
            "step": self.step,
            "sparsity": {n: m.sparsity for n, m in layers.items()},
            "global_density": kept / total if total else 1.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": list(self.history),
            "sparsity": {n: m.sparsity for n, m in self.layers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        for name, s in state.get("sparsity", {}).items():
            self.gm.get_submodule(name).sparsity = float(s)
