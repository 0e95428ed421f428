"""Shared base of the dynamic sparse training passes: mask installation plus a controller.

``DSTPass.call``: every selected Conv/Linear ``layer(x) -> masked_layer(x, W ⊙ M)`` with ``M`` drawn from
the configured layer-sparsity distribution (docs/algorithms.md#layer-sparsity-distributions,
docs/algorithms.md#prune-and-grow-skeleton), ``W ← W ⊙ M``, and a
``SparseController`` stored in ``gm.meta["sparse_controller"]`` that updates the masks while training
runs (``sparsifx.attach(model, optimizer, steps_per_epoch=...)``). Subclasses implement the method:
``dense_grad_at`` (which forward passes need the dense weight gradient), ``before_step`` (update
instead of the optimizer step, RigL), ``after_step`` (GMP) and ``on_epoch_end`` (SET, CTRE, sparse
momentum). Layers whose target sparsity is 0 stay dense and are not part of the controller.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from sparsifx import validate
from sparsifx.distributions import er_epsilon_density, layer_sparsities
from sparsifx.errors import PassError, PreconditionError, RecipeError
from sparsifx.masking import MASKED_TYPES, is_masked, set_mask
from sparsifx.meta_keys import SPARSE_CONTROLLER, STORAGE_NOTES
from sparsifx.module_utils import set_submodule
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.selection import LayerSelection, renamed_exclusion_keys
from sparsifx.sparse_linear import is_sparse_storage, sparse_type

from .mask_ops import DENSE_DRAW_LIMIT, bernoulli_mask, keys_of, random_keys, random_mask, seeded_generator
from .neuron_pruning import NeuronPruning

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "er", "erk", "er_epsilon")
MASK_INITS = ("exact", "bernoulli", "ones")
STORAGES = ("masked", "sparse")


@dataclass(frozen=True)
class MaskConfig:
    """How the initial masks are drawn.

    ``sparsity`` global target; ``distribution`` uniform | er | erk | er_epsilon (SET's
    ``p = ε(n_in+n_out)/(n_in·n_out)``, ignores ``sparsity``); ``epsilon`` for er_epsilon;
    ``erk_power_scale``; ``dense_first_layer``/``dense_last_layer`` keep the first/last selected layer dense
    (None: dense first layer iff uniform, as RigL; the deprecated recipe keys ``dense_first``/``dense_last``
    still work, see ``sparsifx.selection``); ``init`` exact (k random positions) | bernoulli | ones; ``seed``;
    ``storage`` masked (dense weight × mask, the default) | sparse (Linear and 1×1 Conv2d layers become
    ``SparseLinear``/``SparseConv2d1x1``: values
    and indices only, compute and optimizer state proportional to nnz; other layers stay masked).
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    epsilon: float = 13.0
    erk_power_scale: float = 1.0
    dense_first_layer: bool | None = False
    dense_last_layer: bool = False
    init: str = "exact"
    seed: int = 0
    storage: str = "masked"

    FIELDS: ClassVar[tuple[str, ...]] = (
        "sparsity",
        "distribution",
        "epsilon",
        "erk_power_scale",
        "dense_first_layer",
        "dense_last_layer",
        "init",
        "seed",
        "storage",
    )

    def replace(self, params: dict[str, Any]) -> "MaskConfig":
        checked = dict(params)
        if "sparsity" in checked:
            checked["sparsity"] = validate.number("sparsity", checked["sparsity"], 0.0, 1.0, hi_open=True)
        if "distribution" in checked:
            validate.choice("distribution", checked["distribution"], DISTRIBUTIONS)
        if "epsilon" in checked:
            checked["epsilon"] = validate.number("epsilon", checked["epsilon"], 0.0, lo_open=True)
        if "erk_power_scale" in checked:
            checked["erk_power_scale"] = validate.number("erk_power_scale", checked["erk_power_scale"], 0.0)
        if checked.get("dense_first_layer") is not None:
            validate.boolean("dense_first_layer", checked["dense_first_layer"])
        if "dense_last_layer" in checked:
            validate.boolean("dense_last_layer", checked["dense_last_layer"])
        if "init" in checked:
            validate.choice("init", checked["init"], MASK_INITS)
        if "seed" in checked:
            validate.integer("seed", checked["seed"], 0)
        if "storage" in checked:
            validate.choice("storage", checked["storage"], STORAGES)
        return dataclasses.replace(self, **checked)

    def sparsities(self, shapes: dict[str, tuple], custom: dict[str, float]) -> dict[str, float]:
        names = list(shapes)
        dense_first = self.dense_first_layer if self.dense_first_layer is not None else self.distribution == "uniform"
        dense = ([names[0]] if dense_first and names else []) + ([names[-1]] if self.dense_last_layer and names else [])
        if self.distribution == "er_epsilon":
            out = {n: 1.0 - er_epsilon_density(s, self.epsilon) for n, s in shapes.items()}
            return {**out, **{n: 0.0 for n in dense}, **custom}
        return layer_sparsities(
            shapes,
            self.sparsity,
            self.distribution,
            dense_layers=dense,
            custom=custom,
            erk_power_scale=self.erk_power_scale,
        )

    def draw(self, shape: tuple, sparsity: float, generator: torch.Generator) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        if self.init == "bernoulli":
            return bernoulli_mask(shape, 1.0 - sparsity, generator)
        if self.init == "ones":
            return torch.ones(shape, dtype=torch.bool)
        return random_mask(shape, round((1.0 - sparsity) * numel), generator)

    def draw_keys(self, shape: tuple, sparsity: float, generator: torch.Generator) -> torch.Tensor:
        """Sorted linear positions of an initial topology without a dense-size tensor (large layers in sparse
        storage; the same distribution as ``draw``)."""
        numel = math.prod(int(s) for s in shape)
        if self.init == "ones":
            return torch.arange(numel)
        if self.init == "bernoulli":
            k = int(torch.binomial(torch.tensor(float(numel)), torch.tensor(1.0 - sparsity), generator=generator))
        else:
            k = round((1.0 - sparsity) * numel)
        return random_keys(numel, k, generator)


class DSTPass(PassBase):
    """Base of the dynamic sparse training passes (not registered itself)."""

    in_place = True
    preserves_semantics = False
    invalidates_analyses = ()
    layer_params = ("sparsity",)
    default_types: ClassVar[tuple[str, ...]] = ("Conv2d", "Linear", "SparseLinear")
    default_mask: ClassVar[MaskConfig] = MaskConfig()
    changes_nnz: ClassVar[bool] = False  # True where updates change a layer's number of non-zeros (GMP)

    def __init__(self, *, mask: MaskConfig | None = None, selection: LayerSelection | None = None):
        self.mask = mask or self.default_mask
        self.selection = (selection or LayerSelection()).with_defaults(self.default_types)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "DSTPass":
        if isinstance(params, dict):
            params = renamed_exclusion_keys(cls.name, params)  # dense_first / dense_last: deprecated spellings
        schedule = NeuronPruning.from_dict(params.get("neuron_pruning"))
        mask_params = {k: v for k, v in params.items() if k in MaskConfig.FIELDS}
        rest = {k: v for k, v in params.items() if k not in MaskConfig.FIELDS and k != "neuron_pruning"}
        mask = cls.default_mask.replace(mask_params)
        if "mask" in rest:
            raise RecipeError("give mask settings as flat keys", "mask", allowed=", ".join(MaskConfig.FIELDS))
        return super().from_params({**rest, "mask": mask}).set_neuron_pruning(schedule)

    def set_neuron_pruning(self, schedule: "NeuronPruning | dict | None") -> "DSTPass":
        """Hidden-neuron importance pruning (``neuron_pruning.py``): a schedule or its dict turns it on, None off."""
        self.neuron_pruning = NeuronPruning.from_dict(schedule)
        return self

    # --- mask installation -------------------------------------------------------------------------------------
    def _targets(self, gm: fx.GraphModule) -> list[tuple[str, torch.nn.Module]]:
        return [
            (n, m)
            for n, m in self.selection.layers(gm)
            if is_masked(m) or type(m) in MASKED_TYPES or is_sparse_storage(m)
        ]

    def call(self, gm: fx.GraphModule) -> PassResult:
        from .dst_controller import SparseController

        targets = self._targets(gm)
        if not targets:
            log.warning("pass '%s' selected no layer to sparsify", self.label)
            return PassResult(gm, False)
        shapes = {n: tuple(m.shape) if is_sparse_storage(m) else tuple(m.weight.shape) for n, m in targets}
        custom = self.selection.sparsity_overrides(targets)
        sparsities = self.mask.sparsities(shapes, custom)
        generator = seeded_generator("mask", self.mask.seed)
        names, kept_masked = [], []
        for n, m in targets:
            if sparsities[n] <= 0.0:
                continue
            if is_sparse_storage(m):  # already in sparse storage (built by hand, or trained before): kept as it is
                layer = m
            elif self.mask.storage == "sparse" and sparse_type(m) is not None:
                keys = self.initial_keys(shapes[n], sparsities[n], generator)
                layer = sparse_type(m).from_dense(m, keys, generator=generator)
                set_submodule(gm, n, layer)
            else:
                kept_masked += [n] if self.mask.storage == "sparse" else []
                mask = self.initial_mask(shapes[n], sparsities[n], generator)
                layer = set_mask(gm, n, mask)
                with torch.no_grad():
                    layer.weight.mul_(layer.mask)
            layer.dense_grad = False
            names.append(n)
        if kept_masked:
            gm.meta[STORAGE_NOTES] = {
                n: "masked: sparse storage covers Linear and plain 1x1 Conv2d layers only" for n in kept_masked
            }
            log.warning(
                "pass '%s': storage sparse covers Linear and 1x1 Conv2d layers; %d layers stay masked "
                "(dense compute): %s",
                self.label,
                len(kept_masked),
                kept_masked,
            )
        if not names:
            log.warning("pass '%s' selected no layer to sparsify", self.label)
            return PassResult(gm, False)
        on_meta = sorted({n.rpartition(".")[0] or n for n, p in gm.named_parameters() if p.is_meta})
        if on_meta:
            raise PassError(
                f"pass '{self.label}': layers {on_meta} are on the meta device and were not converted "
                "to sparse storage (only sparse-storage Linear/1x1 Conv2d layers can start from the "
                "meta device); build them on a real device, or select them with storage: sparse and "
                "a sparsity above 0"
            )
        gm.meta[SPARSE_CONTROLLER] = SparseController(gm, self, names, target_sparsity=sparsities)
        log.info("pass '%s' masked %d layers: %s", self.label, len(names), {n: round(sparsities[n], 4) for n in names})
        return PassResult(gm, True)

    def initial_mask(self, shape: tuple, sparsity: float, generator: torch.Generator) -> torch.Tensor:
        return self.mask.draw(shape, sparsity, generator)

    def initial_keys(self, shape: tuple, sparsity: float, generator: torch.Generator) -> torch.Tensor:
        """The initial topology of a sparse-storage layer as sorted linear positions: drawn exactly as the masked
        storage would (same positions from the same seed) up to ``DENSE_DRAW_LIMIT`` positions, by index
        sampling beyond (same distribution, no dense-size tensor)."""
        if math.prod(shape) <= DENSE_DRAW_LIMIT:
            return keys_of(self.initial_mask(shape, sparsity, generator))
        return self.mask.draw_keys(shape, sparsity, generator)

    def require_masked_storage(self, why: str, instead: str) -> None:
        """Raise ``RecipeError`` for a method that cannot run on sparse storage (``why``; ``instead``: what to use)."""
        if self.mask.storage == "sparse":
            raise RecipeError(f"{self.label} cannot use storage: sparse: {why}; {instead}", "storage")

    # --- the method protocol the controller calls -----------------------------------------------------------
    def check_attach(self, ctrl) -> None:
        """Raise ``PreconditionError`` when ``attach`` lacks something the method needs."""

    def on_detach(self, ctrl) -> None:
        """Remove method-specific hooks when the controller detaches."""

    def dense_grad_at(self, ctrl, t: int) -> bool:
        """Whether the forward/backward of optimizer step ``t`` needs the dense weight gradient."""
        return False

    def before_step(self, ctrl, t: int) -> bool:
        """Runs before optimizer step ``t``; return True to skip that step (the update replaces it)."""
        return False

    def after_step(self, ctrl, t: int) -> None:
        """Runs after optimizer step ``t`` (masks already re-applied)."""

    def on_epoch_end(self, ctrl, epoch: int) -> None:
        """Runs after the last step of epoch ``epoch`` (1-based) except the last epoch."""

    def weight_grad_density(self, ctrl, name: str, t: int) -> float:
        """Density of the weight gradient computed at step ``t`` (1.0 on dense-gradient steps)."""
        return 1.0 if self.dense_grad_at(ctrl, t) else ctrl.density(name)


def resolve_end_step(ctrl, end_step: int | None, end_fraction: float, who: str) -> int:
    """``end_step`` when given, else ``floor(end_fraction · total steps)`` from ``attach(..., epochs=)``."""
    if end_step is not None:
        return end_step
    if ctrl.total_steps is None:
        raise PreconditionError(
            f"{who} needs its end step: give end_step in the recipe or "
            "attach(..., steps_per_epoch=N, epochs=E) so end_fraction can be applied"
        )
    return int(end_fraction * ctrl.total_steps)
