"""CTRE — Cosine similarity-based and Random Topology Exploration (Atashgahi et al., 2022),
docs/algorithms.md#ctre."""

from __future__ import annotations

import logging
import math

import torch

from sparsifx import validate
from sparsifx.errors import PreconditionError, UnsupportedOpError
from sparsifx.module_utils import eval_mode
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection

from .cosine import CosineStats
from .drop import DROP
from .dst_base import DSTPass, MaskConfig
from .growth import GROW_INIT, GROWTH, grow_top
from .mask_ops import random_among

log = logging.getLogger(__name__)
VARIANTS = ("sim", "seq", "cte")


@register_pass("ctre")
class CTRE(DSTPass):
    """``layer(x) -> masked_layer(x, W ⊙ M)`` with ER(ε) masks; after every epoch but the last, per layer drop
    ``floor(ζ·nnz)`` smallest ``|W| + N(0,1e-5)`` and grow as many positions of largest activation cosine
    similarity ``S`` outside the kept set — no dense gradient is ever computed (``W.grad`` may be None).
    ``sim`` (CTRE_sim): cosine-grown positions that were dropped in this same update are replaced by random
    ones; ``seq`` (CTRE_seq): cosine growth until ``controller.observe(val_metric)`` has not improved for
    ``early_stop_epoch`` epochs, then random growth (SET) for good; ``cte``: cosine only.

    Parameters: mask settings (default ``er_epsilon``, ε 13, bernoulli), ``zeta`` (0.2), ``variant``
    sim|seq|cte, ``early_stop_epoch`` (40), ``activations`` train|data, ``grow_init`` (kaiming_uniform =
    the script's random_uniform). New connections' optimizer slots are zeroed.
    Departure on timing: the reference computes ``S`` with a pass over the whole training set at the start
    of each epoch ≥ 2 and skips the first update (no scores yet). ``activations: data`` runs that pass at the
    update itself, over ``attach(..., data=loader)``, so the scores reflect the current weights (first update
    included); ``activations: train`` (default) accumulates the same sums from the epoch's own training
    forwards and needs no extra pass.
    """

    default_mask = MaskConfig(distribution="er_epsilon", epsilon=13.0, init="bernoulli")
    default_types = ("Linear", "Conv2d")

    def __init__(
        self,
        *,
        mask: MaskConfig | None = None,
        selection: LayerSelection | None = None,
        zeta: float = 0.2,
        variant: str = "sim",
        early_stop_epoch: int = 40,
        activations: str = "train",
        grow_init: str = "kaiming_uniform",
    ):
        super().__init__(mask=mask, selection=selection)
        self.require_masked_storage(
            "its growth score is the cosine similarity of every missing connection, a "
            "dense in x out statistic per layer",
            "use storage: masked, or set (random growth) with storage: sparse",
        )
        self.zeta = validate.number("zeta", zeta, 0.0, 1.0)
        self.variant = validate.choice("variant", variant, VARIANTS)
        self.early_stop_epoch = validate.integer("early_stop_epoch", early_stop_epoch, 1)
        self.activations = validate.choice("activations", activations, ("train", "data"))
        self.grow_init = validate.choice("grow_init", grow_init, GROW_INIT.names())

    def _targets(self, gm):
        targets = super()._targets(gm)
        for name, module in targets:
            conv_ok = isinstance(module, torch.nn.Conv2d) and module.groups == 1 and isinstance(module.padding, tuple)
            if not (isinstance(module, torch.nn.Linear) or conv_ok):
                raise UnsupportedOpError(
                    "CTRE's cosine growth supports Linear and Conv2d (groups=1, explicit "
                    "padding); leave this layer out with `ignore`",
                    module=name,
                )
        return targets

    def check_attach(self, ctrl) -> None:
        if self.activations == "data" and ctrl.data is None:
            raise PreconditionError("ctre with activations: data needs attach(..., data=<iterable of batches>)")
        stats = ctrl.state.get("_stats") or CosineStats(ctrl.gm, ctrl.names, charge=ctrl.flops.charge_extra)
        if self.activations == "train":
            stats.enabled = lambda module: module.training and torch.is_grad_enabled()
            stats.install()
        ctrl.state["_stats"] = stats

    def on_detach(self, ctrl) -> None:
        if "_stats" in ctrl.state:
            ctrl.state["_stats"].remove()

    def random_phase(self, ctrl) -> bool:
        metrics = ctrl.state.get("metrics", [])
        if self.variant != "seq" or not metrics:
            return False
        best = max(range(len(metrics)), key=metrics.__getitem__)
        return len(metrics) - 1 - best >= self.early_stop_epoch

    @torch.no_grad()
    def collect(self, ctrl) -> None:
        """One forward pass over ``ctrl.data`` (eval mode, no grad) accumulating the activation sums."""
        stats: CosineStats = ctrl.state["_stats"]
        stats.reset()
        stats.enabled = lambda module: True
        stats.install()
        ctrl.flops.extra_mode = True
        try:
            with eval_mode(ctrl.gm):
                for batch in ctrl.data:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    ctrl.gm(x)
        finally:
            ctrl.flops.extra_mode = False
            stats.remove()

    @torch.no_grad()
    def on_epoch_end(self, ctrl, epoch: int) -> None:
        stats: CosineStats = ctrl.state["_stats"]
        random = ctrl.state["ctre_random"] = ctrl.state.get("ctre_random", False) or self.random_phase(ctrl)
        if not random:
            if self.activations == "data":
                self.collect(ctrl)
            ctrl.state["cosine"] = stats.scores()
        stats.reset()
        if not random and len(ctrl.state["cosine"]) < len(ctrl.names):
            log.info("ctre: no activation statistics yet at step %d; update skipped", ctrl.step)
            return
        init = GROW_INIT.get(self.grow_init)
        for name, module in ctrl.layers.items():
            n_drop = math.floor(self.zeta * int(module.mask.count_nonzero()))
            keep = DROP.get("magnitude")(module.weight, module.mask, n_drop, ctrl.generator("drop", name))
            if random:
                grown = random_among(~keep, n_drop, ctrl.generator("grow", name))
            else:
                grown = grow_top(GROWTH.get("cosine")(ctrl, name, module), keep, n_drop)
                if self.variant == "sim":
                    collided = grown & module.mask.bool()
                    others = ~keep & ~grown
                    grown = (grown & ~collided) | random_among(
                        others, int(collided.sum()), ctrl.generator("grow", name)
                    )
            ctrl.replace_mask(name, keep | grown, init=init, kind="ctre")
