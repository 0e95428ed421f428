"""Sparse momentum (Dettmers & Zettlemoyer 2019, "Sparse Networks from Scratch"),
docs/algorithms.md#sparse-momentum."""

from __future__ import annotations

import math

import torch

from sparsifx import validate
from sparsifx.errors import PreconditionError
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection

from .dst_base import DSTPass, MaskConfig
from .growth import GROWTH, grow_top
from .mask_ops import momentum_of, topk_mask
from .schedules import cosine_annealing


def redistribute(share: dict[str, float], max_regrowth: dict[str, float], total: float) -> dict[str, float]:
    """sparse_learning ``calc_growth_redistribution``: ``g_l = ceil(μ̂_l·total)`` capped at 0.99·max, the excess
    spread evenly (mean residual) over all layers, iterated until no residual (≤ 1000 rounds)."""
    regrowth: dict[str, float] = {}
    residual, mean_residual, rounds = 1.0, 0.0, 0
    while residual > 0 and rounds < 1000:
        residual = 0.0
        for name, mu in share.items():
            value = regrowth[name] if name in regrowth else math.ceil(mu * total)
            value += mean_residual
            if value > 0.99 * max_regrowth[name]:
                regrowth[name] = 0.99 * max_regrowth[name]
                residual += value - regrowth[name]
            else:
                regrowth[name] = value
        mean_residual = residual / len(regrowth) if regrowth else 0.0
        rounds += 1
    return regrowth


@register_pass("sparse_momentum")
class SparseMomentum(DSTPass):
    """``layer(x) -> masked_layer(x, W ⊙ M)`` with dense weight gradients every step (momentum of zero weights
    accumulates); at the end of every epoch but the last: per layer prune ``ceil(p_l·nnz)`` smallest ``|W|``
    (``p_t`` = CosineAnnealingLR(prune_rate, T_max = total steps, eta_min) stepped per iteration, ``p_l``
    lowered for dense still-growing layers), redistribute the removed count plus the smoothed adjustment
    over layers by mean active ``|momentum|``, grow each layer's share at the largest ``|momentum|`` among
    empty positions. New weights are 0; momentum is never reset.

    Parameters: mask settings (default ``distribution: uniform`` with no dense first layer, ``init:
    bernoulli``, ``sparsity`` 0.95 as the reference density 0.05), ``prune_rate`` (0.5), ``eta_min`` (0.005),
    ``decay`` cosine|constant. Needs ``attach(..., steps_per_epoch=, epochs=)`` and an optimizer with momentum.
    """

    default_mask = MaskConfig(sparsity=0.95, distribution="uniform", dense_first_layer=False, init="bernoulli")

    def __init__(
        self,
        *,
        mask: MaskConfig | None = None,
        selection: LayerSelection | None = None,
        prune_rate: float = 0.5,
        eta_min: float = 0.005,
        decay: str = "cosine",
    ):
        super().__init__(mask=mask, selection=selection)
        self.require_masked_storage(
            "it grows where the dense momentum of missing weights is largest, and sparse "
            "storage keeps momentum at the non-zeros only",
            "use storage: masked, or rigl (bounded dense gradient on update steps) with storage: sparse",
        )
        self.prune_rate = validate.number("prune_rate", prune_rate, 0.0, 1.0)
        self.eta_min = validate.number("eta_min", eta_min, 0.0, 1.0)
        self.decay = validate.choice("decay", decay, ("cosine", "constant"))

    def check_attach(self, ctrl) -> None:
        if ctrl.total_steps is None and self.decay == "cosine":
            raise PreconditionError(
                "sparse_momentum's cosine prune rate needs attach(..., steps_per_epoch=N, epochs=E) (T_max = N·E)"
            )
        ctrl.state.setdefault("baseline_nonzero", sum(ctrl.nnz().values()))
        ctrl.state.setdefault("adjusted_growth", 0.0)
        ctrl.state.setdefault("adjustments", [])

    def dense_grad_at(self, ctrl, t: int) -> bool:
        return True

    def prune_rate_at(self, ctrl, t: int) -> float:
        if self.decay == "constant":
            return self.prune_rate
        return cosine_annealing(self.prune_rate, t, ctrl.total_steps, self.eta_min)

    def layer_prune_rates(self, ctrl, rate: float, share: dict[str, float]) -> dict[str, float]:
        """``adjust_prune_rate``: a layer < 20% sparse whose momentum share exceeds 1/L prunes at most its sparsity."""
        out = {}
        for name in ctrl.layers:
            sparsity = 1.0 - ctrl.density(name)
            out[name] = min(sparsity, rate) if sparsity < 0.2 and share[name] > 1.0 / len(share) else rate
        return out

    def momentum_share(self, ctrl) -> dict[str, float]:
        means = {}
        for name, module in ctrl.layers.items():
            active = module.mask.bool()
            mu = float(momentum_of(ctrl.optimizer, module.weight).abs()[active].mean()) if active.any() else 0.0
            means[name] = 0.0 if math.isnan(mu) else mu
        total = sum(means.values())
        return {n: (m / total if total else 0.0) for n, m in means.items()}

    @torch.no_grad()
    def on_epoch_end(self, ctrl, epoch: int) -> None:
        state = ctrl.state
        share = self.momentum_share(ctrl)
        rates = self.layer_prune_rates(ctrl, self.prune_rate_at(ctrl, ctrl.step), share)
        kept, max_regrowth, removed = {}, {}, 0
        for name, module in ctrl.layers.items():
            nnz = int(module.mask.count_nonzero())
            n_remove = math.ceil(rates[name] * nnz)
            score = module.weight.abs().masked_fill(~module.mask.bool(), float("-inf"))
            kept[name] = topk_mask(score, nnz - n_remove)
            removed += nnz - int(kept[name].sum())
            max_regrowth[name] = (module.mask.numel() - nnz) + n_remove
        regrowth = redistribute(share, max_regrowth, removed + state["adjusted_growth"])
        for name, module in ctrl.layers.items():
            grown = grow_top(GROWTH.get("momentum")(ctrl, name, module), kept[name], math.floor(regrowth[name]))
            ctrl.replace_mask(name, kept[name] | grown, init=None, reset_slots=False, kind="sparse_momentum")
        nnz_new = sum(ctrl.nnz().values())
        state["adjustments"].append(state["baseline_nonzero"] - nnz_new)
        state["adjusted_growth"] = (
            0.25 * state["adjusted_growth"]
            + 0.75 * (state["baseline_nonzero"] - nnz_new)
            + sum(state["adjustments"]) / len(state["adjustments"])
        )
        state.setdefault("prune_rate", []).append((ctrl.step, self.prune_rate_at(ctrl, ctrl.step)))
