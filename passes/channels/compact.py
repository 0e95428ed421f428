"""Pass ``compact``: physically remove channels whose producing weights are already all zero."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx import validate
from sparsifx.masking import effective_weight, is_masked
from sparsifx.meta_keys import CHANNEL_REPORT, REPORT_NOTES
from sparsifx.module_utils import submodule
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.sparse_linear import masked_to_sparse, sparse_to_masked

from .coupling import ChannelAnalysis, analyze_channels
from .importance import member_tensor
from .prune import ChannelPlan, _constraints_hold, _keep_every_member
from .shrink import shrink_with_plan
from .tracker import Member

log = logging.getLogger(__name__)

# members that only add a per-channel constant (their channel is a constant when the weights are zero):
# shrink's exactness probe drops, folds or keeps those channels, exactly as after ``channel_prune``
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _is_constant_member(gm: fx.GraphModule, m: Member) -> bool:
    owner = submodule(gm, m.owner) if m.owner else gm
    return m.tensor == "bias" or isinstance(owner, _NORMS)


def _member_values(gm: fx.GraphModule, m: Member) -> torch.Tensor:
    owner = submodule(gm, m.owner) if m.owner else gm
    if m.tensor == "weight" and is_masked(owner):
        return effective_weight(owner).detach()
    return member_tensor(gm, m).detach()


def dead_units(gm: fx.GraphModule, a: ChannelAnalysis, atol: float = 0.0) -> np.ndarray:
    """``dead[unit]``: every signal-carrying ``out`` member (weights, embeddings, parameters added to the
    channel) is zero (``|w| <= atol``) at the unit's channels; biases and norm affine params may be
    non-zero (they make the channel a constant, which ``shrink`` drops, folds or keeps)."""
    n = len(a.prunable)
    dead, seen = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    for m in a.members:
        if m.role != "out" or _is_constant_member(gm, m):
            continue
        t = _member_values(gm, m)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        zero = (t.abs() <= atol).movedim(m.dim, 0).reshape(t.shape[m.dim], -1).all(1).numpy()
        units = a.unit[m.atoms.numpy()]
        seen[units] = True
        np.logical_and.at(dead, units, zero)
    return dead & seen & a.prunable


@register_pass("compact")
class Compact(PassBase):
    """``conv`` with all-zero output rows -> a smaller ``conv`` (and its consumers), exactly.

    Finds coupled channel units (the ``channel_prune`` analysis) whose weights are all zero in every
    producing layer, e.g. after unstructured or dynamic sparse training, and removes them with ``shrink``:
    a removed channel whose activation is a non-zero constant (BatchNorm bias) is folded into the
    consumer's bias where exact, otherwise kept (``gm.meta["channel_report"]`` says why). At least one
    channel is kept per tensor; a grouped-conv group whose dead channels are unbalanced stays whole.
    Parameters: ``atol`` (weights with ``|w| <= atol`` count as zero; default 0, exact).
    """

    in_place = True
    preserves_semantics = True
    requires_analyses = ("shapes",)

    def __init__(self, *, atol: float = 0.0):
        self.atol = validate.number("atol", atol, 0.0)

    def call(self, gm: fx.GraphModule) -> PassResult:
        sparse_names = sparse_to_masked(gm)  # sparse-storage layers take part as masked ones, and go back after
        try:
            return self._compact(gm)
        finally:
            masked_to_sparse(gm, sparse_names)

    def _compact(self, gm: fx.GraphModule) -> PassResult:
        a = analyze_channels(gm)
        pruned = dead_units(gm, a, self.atol)
        _keep_every_member(a, pruned, np.zeros(len(pruned)))
        notes = []
        for group in a.groups:
            if pruned[group.units].any() and not _constraints_hold(a, group.units, pruned):
                pruned[group.units] = False
                notes.append(
                    f"group of {group.modules[0]} left whole: its dead channels are unbalanced across conv groups"
                )
        candidates = int(pruned.sum())
        modified = shrink_with_plan(gm, ChannelPlan(a, pruned, notes)) if candidates else False
        report = gm.meta.get(CHANNEL_REPORT, {}) if modified else {}
        gm.meta.setdefault(REPORT_NOTES, []).append(
            f"compact: {candidates} all-zero channel units found, {report.get('removed_units', 0)} removed"
            + "".join(f"; {n}" for n in notes)
        )
        log.info("compact: %d dead channel units, modified=%s", candidates, modified)
        return PassResult(gm, modified)
