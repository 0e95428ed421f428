"""Training FLOPs of a dynamic sparse training run, counted as the steps really ran.

Forward hooks on every Conv/Linear record the dense multiply-accumulates of each training forward
(``2·MACs`` FLOPs); at every optimizer step the controller charges, per layer with density ``d`` and
weight-gradient density ``d_w`` (1 on dense-gradient steps: RigL update steps, sparse momentum):
forward ``d·F``, backward ``d·F`` (input gradient) ``+ d_w·F`` (weight gradient), against a dense
``3·F``. RigL's dense gradient is thereby amortised over ΔT exactly as the schedule ran it. Extra
forward passes (CTRE's activation pass) are charged forward-only. Other ops (norms, activations,
pooling) are not counted: they are the same in the sparse and the dense run. CTRE's activation statistics (a
dense ``n_out × n_in`` product per layer and batch) are charged as extra work.

That is the algorithm's (theoretical) figure. Beside it ``executed`` counts what the kernels did: a masked layer
multiplies by its dense ``W ⊙ M`` (``3·F`` whatever its density); a sparse-storage layer does ``3·d·F`` (forward,
input gradient, sampled weight gradient) plus ``F`` for the blocked dense gradient on RigL update steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from sparsifx.analysis.costs import layer_macs_rule


def macs_rule(module: nn.Module):
    """``rule(module, output) -> MACs`` for a Conv1d/2d/3d, Linear or SparseLinear layer (dense-equivalent: a
    sparse layer is charged times its density), else ``None``. The rules are the analysis layer's one table
    (``sparsifx.analysis.costs.COST_RULES``, shared with the report)."""
    return layer_macs_rule(module)


@dataclass
class FlopCounter:
    """Accumulates sparse and dense-equivalent training FLOPs; ``pending`` holds this step's dense MACs."""

    sparse: float = 0.0
    dense: float = 0.0
    executed: float = 0.0
    extra: float = 0.0
    steps: int = 0
    pending: dict[str, float] = field(default_factory=dict)
    extra_mode: bool = False

    def record(self, name: str, macs: float, density: float) -> None:
        if self.extra_mode:
            self.extra += 2.0 * macs * density
        else:
            self.pending[name] = self.pending.get(name, 0.0) + macs

    def charge_extra(self, flops: float) -> None:
        """Work an algorithm needs beside the layers' products (CTRE's activation statistics)."""
        self.extra += float(flops)

    def charge_step(self, densities: dict[str, tuple[float, float, float]]) -> None:
        """``densities[name] = (d, d_w, e)``: density, weight-gradient density and the executed multiple of ``F``
        (3 for a dense or masked layer); names missing are dense layers (1, 1, 3)."""
        for name, macs in self.pending.items():
            d, dw, executed = densities.get(name, (1.0, 1.0, 3.0))
            self.sparse += 2.0 * macs * (2.0 * d + dw)
            self.dense += 2.0 * macs * 3.0
            self.executed += 2.0 * macs * executed
        self.pending.clear()
        self.steps += 1

    def summary(self) -> dict[str, float]:
        total = self.sparse + self.extra
        executed = self.executed + self.extra
        return {
            "training_flops": total,
            "dense_training_flops": self.dense,
            "extra_forward_flops": self.extra,
            "flops_ratio": total / self.dense if self.dense else float("nan"),
            "executed_training_flops": executed,
            "executed_flops_ratio": executed / self.dense if self.dense else float("nan"),
            "steps": self.steps,
        }
