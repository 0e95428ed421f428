"""GMP — gradual magnitude pruning (Zhu & Gupta 2017), docs/algorithms.md#gmp."""

from __future__ import annotations

import math

import torch

from sparsifx import validate
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection
from sparsifx.sparse_linear import is_sparse_storage

from .dst_base import DSTPass, MaskConfig, resolve_end_step
from .mask_ops import topk_mask
from .schedules import UpdateSchedule, gmp_sparsity
from .sparse_updates import magnitude_prune


@register_pass("gmp")
class GMP(DSTPass):
    """``layer(x) -> masked_layer(x, W ⊙ M)`` starting dense (``M = 1``); after optimizer steps ``t0, t0+Δt, …``
    up to ``t_end`` (and at ``t_end`` itself, so the final sparsity is reached even when ``t_end − t0`` is not a
    multiple of Δt) each layer masks its smallest active ``|W|`` to reach ``s_t = s_f + (s_i − s_f)(1 − p)^3``,
    ``p = clip((t − t0)/(t_end − t0), 0, 1)``; pruned weights stay pruned (never regrown).

    Parameters: mask settings (``sparsity`` = final s_f, ``distribution`` of s_f over layers (default uniform,
    no dense first layer)), ``initial_sparsity`` s_i (0), ``begin_step`` (0), ``end_step`` (default
    ``end_fraction``·total steps, 0.75), ``frequency`` Δt (100), ``power`` (3).
    """

    default_mask = MaskConfig(distribution="uniform", dense_first_layer=False, init="ones")
    changes_nnz = True

    def __init__(
        self,
        *,
        mask: MaskConfig | None = None,
        selection: LayerSelection | None = None,
        initial_sparsity: float = 0.0,
        begin_step: int = 0,
        end_step: int | None = None,
        end_fraction: float = 0.75,
        frequency: int = 100,
        power: int = 3,
    ):
        super().__init__(mask=mask, selection=selection)
        self.initial_sparsity = validate.number("initial_sparsity", initial_sparsity, 0.0, 1.0, hi_open=True)
        self.begin_step = validate.integer("begin_step", begin_step, 0)
        self.end_step = None if end_step is None else validate.integer("end_step", end_step, 0)
        self.end_fraction = validate.number("end_fraction", end_fraction, 0.0, 1.0, lo_open=True)
        self.frequency = validate.integer("frequency", frequency, 1)
        self.power = validate.integer("power", power, 1)

    def initial_mask(self, shape: tuple, sparsity: float, generator: torch.Generator) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.bool)

    def schedule(self, ctrl) -> UpdateSchedule:
        return UpdateSchedule(
            self.frequency, self.begin_step, resolve_end_step(ctrl, self.end_step, self.end_fraction, "gmp")
        )

    def check_attach(self, ctrl) -> None:
        self.schedule(ctrl)

    def sparsity_at(self, ctrl, name: str, t: int) -> float:
        sched = self.schedule(ctrl)
        return gmp_sparsity(t, ctrl.target_sparsity[name], self.initial_sparsity, sched.t0, sched.t_end, self.power)

    @torch.no_grad()
    def after_step(self, ctrl, t: int) -> None:
        sched = self.schedule(ctrl)
        if not (sched.is_update(t) or t == sched.t_end):
            return
        for name, module in ctrl.layers.items():
            numel = math.prod(module.shape) if is_sparse_storage(module) else module.mask.numel()
            n_keep = numel - round(self.sparsity_at(ctrl, name, t) * numel)
            if is_sparse_storage(module):
                magnitude_prune(ctrl, name, n_keep)
                continue
            active = module.mask.bool()
            if n_keep >= int(active.sum()):
                continue
            score = module.weight.abs().masked_fill(~active, float("-inf"))
            ctrl.replace_mask(name, topk_mask(score, n_keep) & active, init=None, reset_slots=False, kind="gmp")
