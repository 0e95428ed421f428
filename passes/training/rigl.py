"""RigL — Rigging the Lottery (Evci et al., ICML 2020), docs/algorithms.md#rigl."""

from __future__ import annotations

import math

from sparsifx import validate
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection
from sparsifx.sparse_linear import is_sparse_storage

from .drop import DROP
from .dst_base import DSTPass, MaskConfig, resolve_end_step
from .growth import GROW_INIT, GROWTH, grow_top
from .schedules import DROP_FRACTION_SCHEDULES, UpdateSchedule
from .sparse_updates import rigl_update


@register_pass("rigl")
class RigL(DSTPass):
    """``layer(x) -> masked_layer(x, W ⊙ M)``; at steps ``t0, t0+ΔT, … ≤ T_end``, *instead of* the optimizer
    step:
    per layer drop ``floor(α_t·nnz)`` active weights of smallest ``|W| + N(0,1e-5)``, grow as many positions of
    largest dense ``|∂L/∂(W⊙M)|`` outside the kept set (just-dropped ones may return with their old value);
    new weights and their optimizer slots start at 0. ``α_t`` cosine-decays (TF: fed the global step).

    Parameters: mask settings (``sparsity``, ``distribution`` (default erk; uniform keeps the first layer
    dense as RigL), ``seed``, ...), ``delta_t`` (100), ``drop_fraction`` α (0.3), ``anneal`` cosine|constant,
    ``begin_step`` t0 (0), ``end_step`` T_end (default ``end_fraction``·total steps, 0.75), ``grow_init`` (zeros).
    The dense gradient is computed only on update steps (``dense_grad`` is switched on for those forwards).
    """

    default_mask = MaskConfig(distribution="erk", dense_first_layer=None)

    def __init__(
        self,
        *,
        mask: MaskConfig | None = None,
        selection: LayerSelection | None = None,
        delta_t: int = 100,
        drop_fraction: float = 0.3,
        anneal: str = "cosine",
        begin_step: int = 0,
        end_step: int | None = None,
        end_fraction: float = 0.75,
        grow_init: str = "zeros",
    ):
        super().__init__(mask=mask, selection=selection)
        self.delta_t = validate.integer("delta_t", delta_t, 1)
        self.drop_fraction = validate.number("drop_fraction", drop_fraction, 0.0, 1.0)
        self.anneal = validate.choice("anneal", anneal, DROP_FRACTION_SCHEDULES.names())
        self.begin_step = validate.integer("begin_step", begin_step, 0)
        self.end_step = None if end_step is None else validate.integer("end_step", end_step, 0)
        self.end_fraction = validate.number("end_fraction", end_fraction, 0.0, 1.0, lo_open=True)
        self.grow_init = validate.choice("grow_init", grow_init, GROW_INIT.names())

    def schedule(self, ctrl) -> UpdateSchedule:
        return UpdateSchedule(
            self.delta_t, self.begin_step, resolve_end_step(ctrl, self.end_step, self.end_fraction, "rigl")
        )

    def check_attach(self, ctrl) -> None:
        self.schedule(ctrl)

    def drop_fraction_at(self, ctrl, t: int) -> float:
        sched = self.schedule(ctrl)
        return DROP_FRACTION_SCHEDULES.get(self.anneal)(self.drop_fraction, t, sched.t_end, sched.t0)

    def dense_grad_at(self, ctrl, t: int) -> bool:
        return ctrl.optimizer is not None and self.schedule(ctrl).is_update(t)

    def before_step(self, ctrl, t: int) -> bool:
        if not self.dense_grad_at(ctrl, t):
            return False
        alpha = self.drop_fraction_at(ctrl, t)
        for name, module in ctrl.layers.items():
            if is_sparse_storage(module):
                rigl_update(ctrl, name, alpha, GROW_INIT.get(self.grow_init))
                continue
            n_drop = math.floor(int(module.mask.count_nonzero()) * alpha)
            keep = DROP.get("magnitude")(module.weight, module.mask, n_drop, ctrl.generator("drop", name))
            grown = grow_top(GROWTH.get("gradient")(ctrl, name, module), keep, n_drop)
            ctrl.replace_mask(name, keep | grown, init=GROW_INIT.get(self.grow_init), kind="rigl")
        ctrl.state.setdefault("drop_fraction", []).append((t, alpha))
        return True
