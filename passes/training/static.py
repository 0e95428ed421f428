"""Static sparse training: a fixed random mask (the baseline the DST methods are compared with)."""

from __future__ import annotations

from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection

from .dst_base import DSTPass, MaskConfig


@register_pass("static")
class Static(DSTPass):
    """``layer(x) -> masked_layer(x, W ⊙ M)`` with ``M`` drawn once from the distribution and never changed;
    the controller only re-applies ``W ← W ⊙ M`` after each optimizer step and counts FLOPs.

    Parameters: mask settings (``sparsity``, ``distribution`` uniform|er|erk|er_epsilon (default erk),
    ``epsilon``, ``erk_power_scale``, ``dense_first_layer`` (default: dense first layer iff uniform, as RigL,
    whose baseline this is), ``dense_last_layer``, ``init``, ``seed``) and layer selection.
    """

    default_mask = MaskConfig(distribution="erk", dense_first_layer=None)  # as RigL: uniform keeps first layer dense

    def __init__(self, *, mask: MaskConfig | None = None, selection: LayerSelection | None = None):
        super().__init__(mask=mask, selection=selection)
