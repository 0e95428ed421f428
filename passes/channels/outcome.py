"""How much ``channel_prune`` achieved of its request, and which barriers held the rest whole.

*Achieved* is the fraction of removed channels among the output channels of the selected producer layers
(conv, linear, embedding) that have a ratio > 0, less the channels that reach the model outputs (never pruned by
contract). Barriers, ``round_to``, balanced grouped convs and the unit kept per group all count against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.fx as fx

from sparsifx.errors import PassError
from sparsifx.module_utils import submodule

from .coupling import ChannelAnalysis
from .tracker import FIXED, Tracker, connected_components, tensor_leaves

SHORTFALL_TOLERANCE = 0.1  # warn when the achieved channel removal is below requested - this
TOP_BLOCKERS = 3  # barriers named in the warning, the report note and ChannelShortfallError


class ChannelShortfallError(PassError):
    """``channel_prune`` removed less than ``min_achieved_ratio`` of the channels; ``outcome`` (a
    ``PruneOutcome``) says how much and which barriers blocked the rest."""

    def __init__(self, message: str, outcome: "PruneOutcome"):
        self.outcome = outcome
        super().__init__(message)


@dataclass
class PruneOutcome:
    """Channels ``channel_prune`` was asked to prune: the output channels of the selected producer layers
    (conv, linear, embedding) with a ratio > 0, less those that reach the model outputs (never pruned).
    ``requested`` is their mean ratio, ``achieved`` the fraction removed; channels behind barriers count as
    kept. ``blockers``: ``{"op", "reason", "nodes", "channels"}`` per kind of barrier, most channels first
    (``channels``: how many of them the barriers of that kind hold whole; a channel held by two kinds counts
    for both); ``other_fixed``: unprunable channels no barrier explains (coupled to a model input, a constant,
    a tensor kept whole); ``streams``: with ``streams="approximate"``, ``StreamsReport.to_dict()`` of the
    normalisations pruned through and the masked model's output deviation (``streams.py``)."""

    requested: float
    achieved: float
    channels: int
    removed: int
    blockers: list[dict] = field(default_factory=list)
    other_fixed: int = 0
    streams: dict | None = None

    @property
    def shortfall(self) -> bool:
        return self.channels > 0 and self.achieved < self.requested - SHORTFALL_TOLERANCE

    def describe(self) -> str:
        top = "; ".join(
            f"{b['op']} '{b['nodes'][0]}'"
            + (f" (+{len(b['nodes']) - 1} more)" if len(b["nodes"]) > 1 else "")
            + f" [{b['reason']}]: {b['channels']} channels"
            for b in self.blockers[:TOP_BLOCKERS]
        )
        return (
            f"removed {self.achieved:.1%} of {self.channels} prunable-by-request conv/linear output channels, "
            f"requested {self.requested:.1%}; top barriers: {top or 'none'}"
            + (f"; {self.other_fixed} channels fixed otherwise (model inputs, constants)" if self.other_fixed else "")
        )

    def to_dict(self) -> dict:
        return {
            "requested": self.requested,
            "achieved": self.achieved,
            "channels": self.channels,
            "removed": self.removed,
            "blockers": [dict(b) for b in self.blockers],
            "other_fixed": self.other_fixed,
            "streams": self.streams,
        }


def prune_outcome(
    gm: fx.GraphModule, a: ChannelAnalysis, pruned: np.ndarray, ratios: dict[str, float]
) -> tuple[PruneOutcome, dict[str, int]]:
    """The ``PruneOutcome`` of ``pruned`` for producer layers requested at ``ratios``, and the channels each
    barrier node holds whole. A barrier holds a channel that is unprunable and coupled to the barrier's inputs
    by the analysis's union edges alone (fixing edges left out, so each barrier's reach stays its own)."""
    t = a.tracker
    names = [n for n, r in ratios.items() if r > 0 and n in t.module_atoms]
    if not names:
        return PruneOutcome(0.0, 0.0, 0, 0), {}
    atoms = np.concatenate([t.module_atoms[n].numpy() for n in names])
    want = np.concatenate([np.full(len(t.module_atoms[n]), ratios[n]) for n in names])
    comp = _coupling_components(t)
    fixed = ~a.prunable[a.unit[atoms]]
    outputs = [i for n in gm.graph.nodes if n.op == "output" for i in n.all_input_nodes]
    keep = ~(fixed & np.isin(comp[atoms], comp[_label_atoms(t, outputs)]))
    atoms, want, fixed = atoms[keep], want[keep], fixed[keep]
    removed = int(pruned[a.unit[atoms]].sum())
    held, kinds, explained = {}, {}, np.zeros(len(atoms), dtype=bool)
    nodes = {n.name: n for n in gm.graph.nodes}
    for b in a.barriers:
        node = nodes.get(b["node"])
        if node is None:
            continue
        hit = fixed & np.isin(comp[atoms], comp[_label_atoms(t, node.all_input_nodes)])
        held[b["node"]] = int(hit.sum())
        mask, members = kinds.setdefault((_op_kind(gm, node), b["reason"]), (np.zeros(len(atoms), bool), []))
        mask |= hit
        members.append(b["node"])
        explained |= hit
    blockers = sorted(
        (
            {"op": op, "reason": why, "nodes": members, "channels": int(mask.sum())}
            for (op, why), (mask, members) in kinds.items()
            if mask.any()
        ),
        key=lambda b: -b["channels"],
    )
    n = len(atoms)
    return PruneOutcome(
        float(want.mean()) if n else 0.0,
        removed / n if n else 0.0,
        n,
        removed,
        blockers,
        int((fixed & ~explained).sum()),
    ), held


def _coupling_components(t: Tracker) -> np.ndarray:
    """Components of the atoms under the union edges that do not involve ``FIXED``."""
    a, b = t.edge_arrays()
    keep = (a != FIXED) & (b != FIXED)
    return connected_components(t.n_atoms, a[keep], b[keep])


def _label_atoms(t: Tracker, nodes: Sequence[fx.Node]) -> np.ndarray:
    """The non-FIXED atoms in the labels of ``nodes`` (containers flattened)."""
    found = [leaf.reshape(-1) for n in nodes for leaf in tensor_leaves(t.labels.get(n.name))]
    out = np.unique(torch.cat(found).numpy()) if found else np.zeros(0, dtype=np.int64)
    return out[out != FIXED]


def _op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(submodule(gm, node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))
