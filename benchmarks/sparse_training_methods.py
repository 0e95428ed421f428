"""How the sparse-training benchmark applies each method: one recipe stage per method, schedules scaled to the run.

``sparsify_for_method(method, sparsity, model, schedule, data)`` returns the module to train (``sparsify`` with one
stage) and
``configure(optimizer) -> Hooks``, which attaches the method's controller to the optimizer (``sparsifx.attach``:
the two lines a plain training loop adds). A method whose pass is not registered is reported by ``available`` and
skipped by the benchmark, never faked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx import accounting, sparsify
from sparsifx.masking import masked_layers
from sparsifx.registry import PASSES

ALL_METHODS = ("static", "set", "rigl", "sparse_momentum", "ctre", "gmp", "swat")


@dataclass(frozen=True)
class Schedule:
    """Run length the update schedules are scaled to.

    Whatever the number of real epochs, every run gets the same number of mask updates: the per-epoch methods
    (set, sparse_momentum, ctre) see ``update_period = total/8`` steps as their "epoch" (7 updates: none after the
    last), RigL updates every ``update_period/2`` steps until 75% of the run (about 12 updates), GMP prunes every
    ``update_period/2`` steps from ``update_period`` to 75% of the run.
    """

    total_steps: int
    batch: int
    period: int | None = None  # ``--update-period``: a fixed "epoch" in steps instead of total/8

    @property
    def update_period(self) -> int:
        return self.period if self.period else max(2, self.total_steps // 8)

    @property
    def periods(self) -> int:
        return max(1, self.total_steps // self.update_period)

    @property
    def delta_t(self) -> int:
        return max(1, self.update_period // 2)


# How each method's recipe stage is scaled to the run. DST masks use ERK for every mask method (static included,
# so RigL/SET/... differ from static only by their updates); SWAT keeps its own defaults (uniform, first layer
# dense, last layer sparse).
def _dst(sparsity: float, **params: Any) -> dict[str, Any]:
    return {"sparsity": sparsity, "distribution": "erk", "init": "exact", **params}


STAGES: dict[str, Callable[[float, Schedule], dict[str, Any]]] = {
    "static": lambda s, sch: _dst(s),
    "set": lambda s, sch: _dst(s, zeta=0.3),
    "rigl": lambda s, sch: _dst(s, delta_t=sch.delta_t, drop_fraction=0.3, anneal="cosine", end_fraction=0.75),
    "sparse_momentum": lambda s, sch: _dst(s, prune_rate=0.5, decay="cosine"),
    "ctre": lambda s, sch: _dst(s, zeta=0.2, variant="sim"),
    "gmp": lambda s, sch: _dst(s, begin_step=sch.update_period, end_fraction=0.75, frequency=sch.delta_t),
    "swat": lambda s, sch: {"sparsity": s, "variant": "unstructured", "topk_period": 10},
}
# where a method's training FLOPs come from: the DST controller counts every step as it ran (GMP's dense start,
# RigL's dense-gradient update steps, CTRE's extra forwards); SWAT's densities are constant, so one step of
# sparsifx.accounting.training_flops is exact
FLOPS_FROM_ACCOUNTING = frozenset({"swat"})


@dataclass(frozen=True)
class Hooks:
    """The method's controller once attached (None for dense); it rides on ``optimizer.step()`` itself."""

    method: str = "dense"
    controller: Any = None


def available(methods: tuple[str, ...]) -> tuple[list[str], list[str]]:
    present = [m for m in methods if m in PASSES and m in STAGES]
    return present, [m for m in methods if m not in present]


StageParams = tuple[tuple[str, str, Any], ...]  # (method, key, value) overrides from ``--stage-param``


def stage(method: str, sparsity: float, schedule: Schedule, overrides: StageParams = ()) -> dict[str, Any]:
    """The recipe stage of ``method``: the benchmark's settings above, then the ``overrides`` for it."""
    return {
        "pass": method,
        **STAGES[method](sparsity, schedule),
        **{key: value for m, key, value in overrides if m == method},
    }


def describe(method: str, schedule: Schedule, overrides: StageParams = ()) -> str:
    params = stage(method, 0.9, schedule, overrides)
    params.pop("pass")
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "sparsity")


@torch.no_grad()
def rescale_masked_init(model: nn.Module) -> None:
    """``W ← W / sqrt(d)`` on every masked layer of density ``d`` (variance-preserving sparse init, Evci et al.
    2022 "Gradient flow in sparse neural networks"). Without it the ERK-masked 4-layer MLP does not leave chance
    level within this benchmark's few epochs; GMP (starts dense) and SWAT (no mask) are unaffected."""
    for _name, module in masked_layers(model):
        density = float(module.mask.count_nonzero()) / module.mask.numel()
        if 0.0 < density < 1.0:
            module.weight.mul_(density**-0.5)


def sparsify_for_method(
    method: str,
    sparsity: float,
    model: nn.Module,
    schedule: Schedule,
    data: tuple[torch.Tensor, torch.Tensor],
    rescale_init: bool = True,
    overrides: StageParams = (),
) -> tuple[nn.Module, Callable[[torch.optim.Optimizer], Hooks]]:
    """The model to train and ``configure(optimizer) -> Hooks`` (attaches the method's controller)."""
    if method == "dense":
        return model, lambda optimizer: Hooks()
    gm = sparsify(
        model, {"stages": [stage(method, sparsity, schedule, overrides)]}, example_inputs=(data[0][: schedule.batch],)
    )
    if rescale_init:
        rescale_masked_init(gm)

    def configure(optimizer: torch.optim.Optimizer) -> Hooks:
        ctrl = sparsifx.attach(gm, optimizer, steps_per_epoch=schedule.update_period, epochs=schedule.periods)
        return Hooks(method, ctrl)

    return gm, configure


def _loss(y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: F.cross_entropy(out, y)


def training_flops(model: nn.Module, hooks: Hooks, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training FLOPs (forward + backward, Conv/Linear) per step: the controller's whole-run average for DST
    methods, ``sparsifx.accounting.training_flops`` for dense and SWAT."""
    if hooks.controller is not None and hooks.method not in FLOPS_FROM_ACCOUNTING:
        summary = hooks.controller.training_flops()
        return summary["training_flops"] / max(1, summary["steps"])
    model.train()
    return float(accounting.training_flops(model, (x,)).training)


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes kept for backward by one training forward + cross-entropy on ``(x, y)`` (parameters excluded)."""
    model.train()
    return int(accounting.saved_tensor_bytes(model, (x,), _loss(y)))


# ---------------------------------------------------------------------------------------------- issue 15 targets
def flop_meter(model: nn.Module, hooks: Hooks) -> accounting.MeasuredFlops | None:
    """SWAT: densities measured at every training forward (threshold reuse can make them differ from nominal)."""
    return accounting.MeasuredFlops(model) if hooks.method == "swat" else None


def run_flops(model: nn.Module, hooks: Hooks, meter: accounting.MeasuredFlops | None) -> dict[str, float]:
    """Whole-run training FLOPs / dense, theoretical (what the algorithm needs) and executed (what ran here).

    DST methods: the controller's count of every step as it ran (RigL's dense gradient on update steps up to
    T_end, sparse momentum's dense gradient every step, GMP's density at each step, CTRE's statistics as extra);
    SWAT: ``MeasuredFlops``; dense: 1."""
    if meter is not None:
        summary = meter.summary()
        meter.remove()
    elif hooks.controller is not None:
        summary = hooks.controller.training_flops()
    else:
        return {"flops_ratio": 1.0, "executed_flops_ratio": 1.0}
    return {
        "flops_ratio": summary["flops_ratio"],
        "executed_flops_ratio": summary["executed_flops_ratio"],
        "measured_densities": meter.mean_densities() if meter is not None else None,
    }


def trained_density(model: nn.Module, meter: accounting.MeasuredFlops | None = None) -> float:
    """Whole-model weight density (all Conv/Linear weights, biases excluded) the model ends training with: mask
    non-zeros of masked layers, SWAT's measured forward-weight density (else its Top-K count), dense layers 1."""
    from sparsifx.masking import is_masked
    from sparsifx.passes.training.flops import macs_rule

    measured = meter.mean_densities() if meter is not None else {}
    kept = total = 0.0
    for name, module in model.named_modules():
        if not name or macs_rule(module) is None:
            continue
        numel = module.weight.numel()
        if is_masked(module):
            kept += float(module.mask.count_nonzero())
        elif name in measured and hasattr(module, "swat"):
            kept += measured[name][0] * numel
        elif hasattr(module, "keep_weights") and not module.swat.structured:
            kept += module.keep_weights()
        else:
            kept += numel
        total += numel
    return kept / total if total else 1.0
