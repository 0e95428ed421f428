"""Training FLOPs of a dynamic sparse training run, counted as the steps really ran.

Forward hooks on every Conv/Linear record the dense multiply-accumulates of each training forward
(``2·MACs`` FLOPs); at every optimizer step the controller charges, per layer with density ``d`` and
weight-gradient density ``d_w`` (1 on dense-gradient steps: RigL update steps, sparse momentum):
forward ``d·F``, backward ``d·F`` (input gradient) ``+ d_w·F`` (weight gradient), against a dense
``3·F``. RigL's dense gradient is thereby amortised over ΔT exactly as the schedule ran it. Extra
forward passes (CTRE's activation pass) are charged forward-only. Other ops (norms, activations,
pooling) are not counted: they are the same in the sparse and the dense run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from sparsifx.registry import Registry

MACS: Registry = Registry("training FLOP rule")


@MACS.register("Linear")
def _linear_macs(module: nn.Linear, out: torch.Tensor) -> int:
    return out.numel() * module.in_features


def _conv_macs(module: nn.modules.conv._ConvNd, out: torch.Tensor) -> int:
    return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


for _name in ("Conv1d", "Conv2d", "Conv3d"):
    MACS.register(_name, _conv_macs)


def macs_rule(module: nn.Module):
    for cls in type(module).__mro__:
        if cls.__name__ in MACS:
            return MACS.get(cls.__name__)
    return None


@dataclass
class FlopCounter:
    """Accumulates sparse and dense-equivalent training FLOPs; ``pending`` holds this step's dense MACs."""
    sparse: float = 0.0
    dense: float = 0.0
    extra: float = 0.0
    steps: int = 0
    pending: dict[str, float] = field(default_factory=dict)
    extra_mode: bool = False

    def record(self, name: str, macs: float, density: float) -> None:
        if self.extra_mode:
            self.extra += 2.0 * macs * density
        else:
            self.pending[name] = self.pending.get(name, 0.0) + macs

    def charge_step(self, densities: dict[str, tuple[float, float]]) -> None:
        """``densities[name] = (d, d_w)``; names missing are dense layers (1, 1)."""
        for name, macs in self.pending.items():
            d, dw = densities.get(name, (1.0, 1.0))
            self.sparse += 2.0 * macs * (2.0 * d + dw)
            self.dense += 2.0 * macs * 3.0
        self.pending.clear()
        self.steps += 1

    def summary(self) -> dict[str, float]:
        total = self.sparse + self.extra
        return {"training_flops": total, "dense_training_flops": self.dense, "extra_forward_flops": self.extra,
                "flops_ratio": total / self.dense if self.dense else float("nan"), "steps": self.steps}
