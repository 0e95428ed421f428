"""Closed-form schedules of the dynamic sparse training methods (docs/algorithms.md#sparse-momentum,
docs/algorithms.md#rigl, docs/algorithms.md#gmp).

* ``cosine_drop_fraction`` — RigL's drop fraction ``α_t = α/2·(1 + cos(π·min(t, T_end−t0)/(T_end−t0)))``
  (TF ``cosine_decay`` fed the global step ``t``, not ``t − t0``).
* ``cosine_annealing`` — sparse momentum's prune rate, ``CosineAnnealingLR(rate, T_max, eta_min)`` in closed form.
* ``gmp_sparsity`` — Zhu & Gupta's cubic ``s_t = s_f + (s_i − s_f)(1 − p)^3``,
  ``p = clip((t−t0)/(t_end−t0), 0, 1)``.
* ``UpdateSchedule`` — which steps update the mask: ``t0 ≤ t ≤ T_end`` and ``(t − t0) % ΔT == 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparsifx.registry import Registry

DROP_FRACTION_SCHEDULES: Registry = Registry("drop fraction schedule")


@DROP_FRACTION_SCHEDULES.register("cosine")
def cosine_drop_fraction(alpha: float, t: int, t_end: int, t0: int = 0) -> float:
    span = max(1, t_end - t0)
    return alpha / 2.0 * (1.0 + math.cos(math.pi * min(t, span) / span))


@DROP_FRACTION_SCHEDULES.register("constant")
def constant_drop_fraction(alpha: float, t: int, t_end: int, t0: int = 0) -> float:
    return alpha


def cosine_annealing(rate: float, t: int, t_max: int, eta_min: float = 0.005) -> float:
    """``torch.optim.lr_scheduler.CosineAnnealingLR`` value after ``t`` steps (closed form, ``t ≤ t_max``)."""
    t = min(t, t_max)
    return eta_min + (rate - eta_min) * (1.0 + math.cos(math.pi * t / max(1, t_max))) / 2.0


def gmp_sparsity(t: int, final: float, initial: float = 0.0, t0: int = 0, t_end: int = 1, power: int = 3) -> float:
    p = min(1.0, max(0.0, (t - t0) / max(1, t_end - t0)))
    return final + (initial - final) * (1.0 - p) ** power


@dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates at steps ``t0, t0+ΔT, … ≤ t_end`` (``t`` counts optimizer steps from 0)."""

    delta_t: int
    t0: int
    t_end: int

    def is_update(self, t: int) -> bool:
        return self.t0 <= t <= self.t_end and (t - self.t0) % self.delta_t == 0
