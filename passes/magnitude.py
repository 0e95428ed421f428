"""Pass ``magnitude``: unstructured per-layer magnitude masks (one-shot pruning or a sparse init)."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from sparsifx import validate
from sparsifx.distributions import KINDS, layer_sparsities
from sparsifx.masking import effective_weight, get_mask, set_mask
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear", "Conv1D")  # Conv1D: transformers' (GPT-2) layer


def magnitude_mask(weight: torch.Tensor, zeros: int) -> torch.Tensor:
    """Mask with exactly ``zeros`` zeros at the smallest ``|weight|``; ties go to the lower flat index."""
    flat = weight.detach().abs().flatten()
    mask = torch.ones_like(flat)
    if zeros <= 0:
        return mask.view_as(weight)
    kth = flat.kthvalue(zeros).values  # O(N) selection instead of a full sort
    mask[flat < kth] = 0
    ties = (flat == kth).nonzero().flatten()
    mask[ties[: zeros - int((flat < kth).sum())]] = 0
    return mask.view_as(weight)


def target_zeros(sparsity: float, numel: int) -> int:
    """Zeros for a layer: ``round(s·N)``, clamped to ``[0, N]``."""
    return min(numel, max(0, round(sparsity * numel)))


@register_pass("magnitude")
class MagnitudePruning(PassBase):
    """``layer(x) -> masked_layer(x)`` with ``W·M``; ``M`` zeros the ``round(s_l·N_l)`` smallest ``|W·M_old|``.

    Parameters: ``sparsity`` (global target in [0, 1)); ``distribution`` (``uniform``, ``er`` or ``erk``,
    docs/algorithms.md#layer-sparsity-distributions) spreading it over the selected layers;
    ``erk_power_scale`` (exponent on ER/ERK scores); ``dense_first_layer`` / ``dense_last_layer`` (keep the
    first/last selected layer, in ``named_modules`` order, dense; the one spelling of this exclusion in every
    pass, see ``sparsifx.selection``); ``selection`` (``types``, ``ignore``, ``by_type`` / ``by_pattern`` /
    ``by_name`` overrides of ``sparsity``). A per-layer override fixes that layer's sparsity exactly and
    takes it out of the distribution's budget. Scores use the effective weight, so a layer that is
    already masked keeps its pruned weights pruned first. Weights are not changed: the mask is a
    buffer of a ``Masked*`` layer (``sparsifx.masking.bake_masks`` zeroes them for good).
    """

    layer_params = ("sparsity",)
    in_place = True

    def __init__(
        self,
        *,
        sparsity: float = 0.5,
        distribution: str = "uniform",
        erk_power_scale: float = 1.0,
        dense_first_layer: bool = False,
        dense_last_layer: bool = False,
        selection: LayerSelection | None = None,
    ) -> None:
        self.sparsity = validate.number("sparsity", sparsity, 0.0, 1.0, hi_open=True)
        self.distribution = validate.choice("distribution", distribution, KINDS)
        self.erk_power_scale = validate.number("erk_power_scale", erk_power_scale, 0.0, None)
        self.dense_first_layer = validate.boolean("dense_first_layer", dense_first_layer)
        self.dense_last_layer = validate.boolean("dense_last_layer", dense_last_layer)
        self.selection = (selection or LayerSelection()).with_defaults(DEFAULT_TYPES)

    def sparsities(self, gm: torch.nn.Module) -> dict[str, float]:
        """Target sparsity per selected layer (name -> s_l)."""
        layers = list(self.selection.layers(gm))
        if not layers:
            return {}
        shapes = {name: tuple(m.weight.shape) for name, m in layers}
        custom = self.selection.sparsity_overrides(layers)
        dense = [
            n
            for n in (
                layers[0][0] if self.dense_first_layer else None,
                layers[-1][0] if self.dense_last_layer else None,
            )
            if n and n not in custom
        ]
        if len(custom) == len(layers):
            return custom
        kind = self.distribution if self.sparsity > 0 else "uniform"  # same result, no ε solve at S = 0
        return layer_sparsities(
            shapes, self.sparsity, kind, dense_layers=dense, custom=custom, erk_power_scale=self.erk_power_scale
        )

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for name, s in self.sparsities(gm).items():
            module = gm.get_submodule(name)
            mask = magnitude_mask(effective_weight(module), target_zeros(s, module.weight.numel()))
            old = get_mask(module)
            unchanged = bool(mask.all()) if old is None else torch.equal(old, mask.to(old.dtype))
            if unchanged:
                continue
            set_mask(gm, name, mask)
            modified = True
            log.debug("magnitude: %s sparsity %.4f", name, s)
        return PassResult(gm, modified)
