"""SET — Sparse Evolutionary Training (Mocanu et al., Nat. Commun. 2018), docs/algorithms.md#set."""

from __future__ import annotations

import torch

from sparsifx import validate
from sparsifx.masking import MASKED_TYPES, is_masked
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection
from sparsifx.sparse_linear import is_sparse_storage

from .drop import DROP
from .dst_base import DSTPass, MaskConfig
from .growth import GROW_INIT
from .mask_ops import random_among
from .sparse_updates import set_evolve


@register_pass("set")
class SET(DSTPass):
    """``layer(x) -> masked_layer(x, W ⊙ M)`` with Erdős–Rényi(ε) masks; after every epoch but the last, per
    layer remove ζ of the negative and ζ of the positive active weights closest to zero, and add as many
    connections uniformly at random among the positions left empty (a just-removed one may be drawn again,
    and is then re-initialised, as the reference's rejection sampling). No gradient is read.

    Parameters: mask settings (default ``distribution: er_epsilon``, ``epsilon`` 13, ``init: bernoulli``),
    ``zeta`` ζ (0.3), ``grow_init`` zeros|normal|kaiming_uniform (default zeros, the Keras version; ``normal`` =
    N(0,1)/10 of the numpy tutorial), ``evolve_last`` (False: the output layer keeps its topology, as the
    truly-sparse code; a design choice, docs/algorithms.md#set). Optimizer slots of new connections are zeroed.
    """

    default_mask = MaskConfig(distribution="er_epsilon", epsilon=13.0, init="bernoulli")

    def __init__(
        self,
        *,
        mask: MaskConfig | None = None,
        selection: LayerSelection | None = None,
        zeta: float = 0.3,
        grow_init: str = "zeros",
        evolve_last: bool = False,
    ):
        super().__init__(mask=mask, selection=selection)
        self.zeta = validate.number("zeta", zeta, 0.0, 1.0)
        self.grow_init = validate.choice("grow_init", grow_init, GROW_INIT.names())
        self.evolve_last = validate.boolean("evolve_last", evolve_last)

    def evolving(self, ctrl) -> list[str]:
        """Controlled layers that evolve: all but the model's output layer unless ``evolve_last``."""
        if self.evolve_last:
            return list(ctrl.names)
        layers = [
            n
            for n, m in ctrl.gm.named_modules()
            if n and (is_masked(m) or type(m) in MASKED_TYPES or is_sparse_storage(m))
        ]
        return [n for n in ctrl.names if n != layers[-1]]

    @torch.no_grad()
    def on_epoch_end(self, ctrl, epoch: int) -> None:
        init = GROW_INIT.get(self.grow_init)
        for name in self.evolving(ctrl):
            module = ctrl.gm.get_submodule(name)
            if is_sparse_storage(module):
                set_evolve(ctrl, name, self.zeta, init)
                continue
            keep = DROP.get("set_zeta")(module.weight, module.mask, self.zeta, None)
            n_new = int(module.mask.count_nonzero()) - int(keep.sum())
            grown = random_among(~keep, n_new, ctrl.generator("grow", name))
            module.mask.masked_fill_(grown, 0)  # re-drawn positions count as new: re-initialised below
            ctrl.replace_mask(name, keep | grown, init=init, kind="set")
