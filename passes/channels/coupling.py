"""Channel-coupling analysis: run the channel rules over the FX graph, then form units and groups.

``analyze_channels(gm)`` needs ``node.meta["tensor_meta"]`` (the ``shapes`` analysis); registered as the
analysis ``channel_coupling`` (``gm.meta["channel_analysis"]``). Each node's
output gets a label tensor (see ``tracker``); an op without a rule is a barrier (its channels stay
whole) and is listed in ``ChannelAnalysis.barriers``. A *unit* is a set of channels pruned as one (a
connected component of coupled atoms); a *group* is a set of units of coupled producer spaces
(e.g. every conv feeding one residual stream) that a ratio applies to.
"""

from __future__ import annotations

import builtins
import functools
import logging
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from sparsifx.analysis import register_analysis
from sparsifx.errors import PreconditionError
from sparsifx.meta_keys import CHANNEL_ANALYSIS, EXAMPLE_INPUTS, TENSOR_META
from sparsifx.module_utils import submodule

from . import rules_attention, rules_elementwise, rules_index, rules_layer_fn, rules_modules, rules_norm_fn, rules_shape  # noqa: F401  (register rules)  # noqa: F401  (register rules)
from .containers import PYTHON_MODULES, container_value, is_container_op, protect_outputs
from .rules_base import UNKNOWN, RuleContext, find_param_dim, find_rule, is_label, owner_type, shape_of
from .tracker import FIXED, Member, Tracker, connected_components
from .zeros import is_zero_after

log = logging.getLogger(__name__)

_SHAPE_ATTRS = {"shape", "ndim", "dtype", "is_cuda", "device"}


@dataclass
class Group:
    """Units pruned under one ratio; ``modules`` are its producer layers."""

    index: int
    units: np.ndarray
    modules: tuple[str, ...]


@dataclass
class ChannelAnalysis:
    tracker: Tracker
    unit: np.ndarray  # atom -> unit id
    prunable: np.ndarray  # unit id -> bool
    groups: list[Group]
    signature: tuple[str, ...]

    @property
    def barriers(self) -> list[dict[str, str]]:
        return self.tracker.barriers

    @property
    def members(self) -> list[Member]:
        return self.tracker.members

    @functools.cached_property
    def constraint_units(self) -> list[tuple[np.ndarray, int, bool]]:
        """Every grouped-conv constraint as (unit id per position, number of blocks, droppable)."""
        return [(self.unit[c.atoms.numpy()], c.blocks, c.droppable) for c in self.tracker.constraints]

    @functools.cached_property
    def constraints_of_unit(self) -> dict[int, list[int]]:
        """Unit id -> indices into ``constraint_units`` of the constraints that involve it."""
        out: dict[int, list[int]] = {}
        for i, (cu, *_) in enumerate(self.constraint_units):
            for u in np.unique(cu).tolist():
                out.setdefault(u, []).append(i)
        return out


def graph_signature(gm: fx.GraphModule) -> tuple[str, ...]:
    return tuple(f"{n.op}:{n.name}" for n in gm.graph.nodes)


def model_inputs(gm: fx.GraphModule, seed: int) -> tuple[tuple, tuple]:
    """(example inputs, a random draw of the same shapes) from ``gm.meta`` / placeholder shapes."""
    gen = torch.Generator().manual_seed(seed)
    example = gm.meta.get(EXAMPLE_INPUTS)
    example = (example,) if isinstance(example, torch.Tensor) else example
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    while holders and _optional_unshaped(holders[-1], example):  # ``attn_mask=None``: runs on its default
        holders.pop()
    metas = [n.meta.get(TENSOR_META) for n in holders]
    if any(m is None for m in metas):
        raise PreconditionError("shrink needs input shapes (node.meta['tensor_meta'] on placeholders)")
    rand = tuple(
        torch.randn(m.shape, generator=gen, dtype=m.dtype)
        if m.dtype.is_floating_point
        else torch.zeros(m.shape, dtype=m.dtype)
        for m in metas
    )
    return (tuple(example) if example is not None else rand), rand


def _optional_unshaped(node: fx.Node, example) -> bool:
    """A trailing placeholder with a non-tensor default (``attn_mask=None``, ``is_causal=False``) that no example
    input fills and no shape was recorded for: it carries no channels and the model runs on its default."""
    index = [n for n in node.graph.nodes if n.op == "placeholder"].index(node)
    given = example is not None and index < len(example)
    return (
        not given
        and TENSOR_META not in node.meta
        and len(node.args) == 1
        and (node.args[0] is None or isinstance(node.args[0], (bool, int, float, str)))
    )


def analyze_channels(gm: fx.GraphModule, streams: str = "exact") -> ChannelAnalysis:
    """Propagate channel labels through ``gm`` and compute units and groups; ``streams="approximate"`` lets
    channel-wide normalisations pass channels, recorded as approximations (``streams.py``)."""
    if not any(TENSOR_META in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        raise PreconditionError(
            "channel analysis needs shapes: trace with example_inputs or run the 'shapes' "
            "analysis (node.meta['tensor_meta'])"
        )
    cx = RuleContext(gm, Tracker(streams))
    for node in gm.graph.nodes:
        cx.env[node], rule = _visit(cx, node)
        cx.t.labels[node.name] = cx.env[node]
        if node.op in ("get_attr", "call_function", "call_method", "call_module") and is_zero_after(
            cx.t.zero_nodes, cx, node, rule
        ):
            cx.t.zero_nodes.add(node.name)
    _unite_shared_members(gm, cx.t)
    return _finalize(gm, cx.t)


def _visit(cx: RuleContext, node: fx.Node):
    """The node's labels (or static value) and the rule that computed them."""
    if node.op == "placeholder":
        return cx.fixed(node), None
    if node.op == "get_attr":
        return _param_labels(cx, node), None
    if node.op == "output":
        protect_outputs(cx, node)
        return None, None
    if TENSOR_META not in node.meta:
        return _static(cx, node), None
    if is_container_op(node):
        return container_value(cx, node), None
    rule = find_rule(cx.gm, node)
    if rule is None:
        cx.t.barrier(
            node,
            "no channel rule for this op",
            [cx.value(a) for a in node.args] + [cx.value(v) for v in node.kwargs.values()],
        )
        return cx.fixed(node), None
    return rule(cx, node), rule


def _param_labels(cx: RuleContext, node: fx.Node):
    """A parameter/buffer read by ``get_attr``: passive atoms along its last non-trivial dim."""
    value = _fetch(cx.gm, node.target)
    if not isinstance(value, torch.Tensor):
        return value
    shape = tuple(value.shape)
    dims = [d for d, s in enumerate(shape) if s > 1]
    if not dims or not value.is_floating_point():
        return torch.full((1,) * len(shape), FIXED, dtype=torch.long)
    owner, _, attr = node.target.rpartition(".")
    hint = find_param_dim(owner_type(cx.gm, node, owner), attr)  # e.g. a conv weight: its rows (PARAM_DIMS)
    d = hint if hint is not None and hint < len(shape) and shape[hint] > 1 else dims[-1]
    atoms = cx.t.fresh(shape[d], None)
    cx.t.members.append(Member(owner, attr, d, atoms, "out", node.name))
    return cx.t.place(atoms, d, len(shape))


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _static(cx: RuleContext, node: fx.Node):
    """Evaluate a non-tensor node (sizes, int arithmetic); tensors consumed here are fixed."""
    args = cx.value(node.args)
    kwargs = cx.value(node.kwargs)
    if node.op == "call_method" and node.target in ("size", "dim") and is_label(args[0]):
        shape = torch.Size(shape_of(node.args[0]))
        if node.target == "dim":
            return len(shape)
        return shape if len(args) < 2 else shape[args[1]]
    if node.op == "call_function" and node.target is builtins.getattr and is_label(args[0]):
        if args[1] == "shape":
            return torch.Size(shape_of(node.args[0]))
        if args[1] == "ndim":
            return len(shape_of(node.args[0]))
        return UNKNOWN
    flat = list(args) + list(kwargs.values())
    labels = [a for a in fx.node.map_aggregate(flat, lambda a: a) if is_label(a)]
    if labels:
        cx.t.barrier(node, "tensor consumed by a non-tensor op", labels)
        return UNKNOWN
    mod = getattr(node.target, "__module__", None) or ""
    if node.op == "call_function" and (mod in PYTHON_MODULES or node.target in (operator.getitem, math.sqrt)):
        if any(a is UNKNOWN for a in flat):
            return UNKNOWN
        try:
            return node.target(*args, **kwargs)
        except Exception:  # a static helper that needs runtime values: its result stays unknown
            return UNKNOWN
    return UNKNOWN


def tied_tensors(gm: torch.nn.Module) -> list[list[tuple[str, str]]]:
    """Parameters and buffers held by several modules (tied weights such as ``lm_head.weight = embed.weight``):
    one ``[(module path, attribute), ...]`` per tensor, one entry per holder (a module registered under two
    names is one holder)."""
    holders: dict[int, dict[tuple[int, str], tuple[str, str]]] = {}
    for path, mod in gm.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for attr, value in store.items():
                if value is not None:
                    holders.setdefault(id(value), {}).setdefault((id(mod), attr), (path, attr))
    return [list(h.values()) for h in holders.values() if len(h) > 1]


def _unite_shared_members(gm: fx.GraphModule, t: Tracker) -> None:
    """A tensor dim sliced by several members is sliced once: members of one tensor object along one dim (a
    module called twice, a parameter read twice, weights tied between modules) share their atoms."""
    first: dict[tuple[int, int], torch.Tensor] = {}
    sliced: set[tuple[int, str, int]] = set()
    reads: set[tuple[int, int]] = set()
    getattr_nodes = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    for m in t.members:
        owner = submodule(gm, m.owner)
        key = (id(getattr(owner, m.tensor)), m.dim)
        sliced.add((id(owner), m.tensor, m.dim))
        if m.node in getattr_nodes and m.node not in t.whole_reads:  # whole: every reader slices its dims
            reads.add(key)
        if key in first and first[key].numel() == m.atoms.numel():
            t.union(first[key], m.atoms)
        elif key in first:
            t.fix([first[key], m.atoms])
        else:
            first[key] = m.atoms
    _keep_unsliced_dims_whole(gm, t, first, sliced, reads)


def _keep_unsliced_dims_whole(gm: fx.GraphModule, t: Tracker, first: dict, sliced: set, reads: set) -> None:
    """A dim of a tensor stays whole where one of its readers does not slice it with the channels: a
    ``get_attr`` read labels one dim only, and a tied tensor's holder may not slice a dim another one does (an
    embedding's vocabulary tied to an output layer's rows). Shrinking never unties or misreads a tensor."""
    for tensor_id, dim in reads:
        for (other_id, other_dim), atoms in first.items():
            if other_id == tensor_id and other_dim != dim:
                t.fix(atoms)
    for holders in tied_tensors(gm):
        slots = [(submodule(gm, path), attr) for path, attr in holders]
        value = getattr(*slots[0])
        for dim in range(value.ndim):
            if (id(value), dim) in first and any((id(mod), attr, dim) not in sliced for mod, attr in slots):
                log.info(
                    "tied tensor %s: dim %d kept whole (not every holder slices it with the channels)",
                    " = ".join(f"{p}.{a}" if p else a for p, a in holders),
                    dim,
                )
                t.fix(first[(id(value), dim)])


def _finalize(gm: fx.GraphModule, t: Tracker) -> ChannelAnalysis:
    unit = t.components()
    space = t.atom_space().numpy()
    n_units = int(unit.max()) + 1
    prunable = np.zeros(n_units, dtype=bool)
    prunable[unit[space >= 0]] = True
    prunable[unit[FIXED]] = False
    prod = np.nonzero((space >= 0) & prunable[unit])[0]
    u, s = unit[prod], space[prod]
    n_spaces = len(t.spaces)
    label = connected_components(n_units + n_spaces, u, n_units + s)
    uids = np.nonzero(prunable)[0]
    order = np.argsort(label[uids], kind="stable")
    labs, starts = np.unique(label[uids][order], return_index=True)
    members = np.split(uids[order], starts[1:]) if len(uids) else []
    mods: dict[int, set[str]] = {}
    for key in np.unique(label[u].astype(np.int64) * n_spaces + s).tolist():
        lab, ss = divmod(key, n_spaces)
        mods.setdefault(lab, set()).add(t.spaces[ss])
    out = [
        Group(i, units, tuple(sorted(mods.get(int(lab), ()))))
        for i, (lab, units) in enumerate(zip(labs.tolist(), members))
    ]
    log.info("channel analysis: %d units in %d groups, %d barriers", int(prunable.sum()), len(out), len(t.barriers))
    return ChannelAnalysis(t, unit, prunable, out, graph_signature(gm))


def _has_current_analysis(gm: fx.GraphModule) -> bool:
    found = gm.meta.get(CHANNEL_ANALYSIS)
    return isinstance(found, ChannelAnalysis) and found.signature == graph_signature(gm)


@register_analysis(
    "channel_coupling",
    key=CHANNEL_ANALYSIS,
    present=_has_current_analysis,
    needs_inputs=False,
    remedy="record shapes first (the 'shapes' analysis: pass example_inputs)",
)
def channel_coupling(gm: fx.GraphModule, example_inputs=None) -> None:
    """Analysis ``channel_coupling``: ``gm.meta["channel_analysis"]`` = ``analyze_channels(gm)`` (coupled channel
    units and groups). Needs shapes (``node.meta["tensor_meta"]``): declare ``("shapes", "channel_coupling")``."""
    gm.meta[CHANNEL_ANALYSIS] = analyze_channels(gm)
