"""Pass ``shrink``: physically remove the channels a ``ChannelPlan`` pruned, exactly.

Before cutting, consumer inputs that are not provably zero (``zeros.py``) are probed: the masked model
runs twice (the example inputs and a random draw) and the pruned positions are checked: zero ->
dropped; a non-zero constant -> folded into the consumer's bias when that is exact (``Linear``;
``Conv`` with groups 1 and no padding); anything else -> the unit is kept and the report says why.
Shapes in ``node.meta["tensor_meta"]`` are then updated from the plan (parameter reads from the sliced
tensors), without running the model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from sparsifx.errors import PassError, PreconditionError
from sparsifx.masking import effective_weight
from sparsifx.meta_keys import CHANNEL_PLAN, CHANNEL_REPORT, REPORT_NOTES, TENSOR_META
from sparsifx.module_utils import eval_mode, submodule
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.pass_manager import run_model
from sparsifx.registry import register_pass

from .coupling import graph_signature, model_inputs, tied_tensors
from .importance import member_tensor
from .prune import ChannelPlan
from .rewrites import REWRITES
from .rules_shape import varying_dim
from .slicers import is_hf_conv1d, slice_module

log = logging.getLogger(__name__)


@register_pass("shrink")
class Shrink(PassBase):
    """``conv(x)`` with pruned (zeroed) channels -> a smaller ``conv``; reshape/split/slice constants,
    groups and size attributes renumbered; constant channels folded into consumer biases.

    Parameters: ``seed`` (the random input draw of the exactness check). Needs ``gm.meta["channel_plan"]``
    (from ``channel_prune``); without one it raises ``PreconditionError``. A plan of
    ``channel_prune(streams="approximate")`` that prunes through normalisations is not exact: the manager's
    verification is waived (``exactness_waived``) and ``gm.meta["channel_report"]["streams"]`` gives the measured
    output deviation instead (``streams.py``).
    """

    in_place = True
    preserves_semantics = True
    requires_analyses = ("shapes",)

    def __init__(self, *, seed: int = 0):
        self.seed = seed

    def requires(self, gm: fx.GraphModule) -> None:
        super().requires(gm)
        if gm.meta.get(CHANNEL_PLAN) is None:
            raise PreconditionError(
                f"pass 'shrink' needs gm.meta['{CHANNEL_PLAN}'] (the ChannelPlan that 'channel_prune' records), and "
                "this module has none: run 'channel_prune' before 'shrink' (in one recipe or PassManager), or use "
                "'compact' to remove channels that are already all zero"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        plan = gm.meta[CHANNEL_PLAN]
        modified = shrink_with_plan(gm, plan, seed=self.seed)
        del gm.meta[CHANNEL_PLAN]
        return PassResult(gm, modified)

    def exactness_waived(self, gm: fx.GraphModule) -> str | None:
        """Why shrinking ``gm``'s plan cannot equal the masked model: it prunes through approximated norms."""
        plan = gm.meta.get(CHANNEL_PLAN)
        return plan.streams.exactness_check if plan is not None and plan.streams is not None else None


class _Probe(fx.Interpreter):
    """Runs the model and reduces each checked input to per-position (min, max, first) at pruned positions."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, list[tuple[int, int, np.ndarray]]]):
        super().__init__(gm)
        self.wanted, self.stats = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for key, dim, idx in self.wanted.get(n.name, ()):
            v = out.detach().index_select(dim, torch.as_tensor(idx)).movedim(dim, 0).reshape(len(idx), -1)
            self.stats[key] = (v.amin(1), v.amax(1), v[:, 0].clone())
        return out


def _members_zeroed(gm: fx.GraphModule, plan: ChannelPlan, pruned: np.ndarray) -> bool:
    """Whether every ``out`` member of every pruned unit is exactly zero (as ``channel_prune`` leaves it)."""
    a = plan.analysis
    if plan.untouched(gm):
        return True
    with torch.no_grad():
        for m in a.members:
            if m.role != "out":
                continue
            idx = np.nonzero(pruned[a.unit[m.atoms.numpy()]])[0]
            if len(idx) and bool(member_tensor(gm, m).index_select(m.dim, torch.as_tensor(idx)).any()):
                return False
    return True


def _probe(gm: fx.GraphModule, plan: ChannelPlan, pruned: np.ndarray, inputs_pair) -> dict[int, list]:
    """Stats of every checked consumer input that is not provably zero (no model run if there is none)."""
    a = plan.analysis
    trusted = a.tracker.zero_nodes if _members_zeroed(gm, plan, pruned) else set()
    wanted: dict[str, list] = defaultdict(list)
    for key, c in enumerate(a.tracker.checks):
        idx = np.nonzero(pruned[a.unit[c.atoms.numpy()]])[0]
        if len(idx) and c.src not in trusted:
            wanted[c.src].append((key, c.dim, idx))
    if not wanted:
        return {}
    runs = []
    with eval_mode(gm), torch.no_grad():
        for inputs in inputs_pair:
            probe = _Probe(gm, wanted)
            probe.run(*inputs)
            runs.append(probe.stats)
    return {key: [r[key] for r in runs] + [idx] for node_checks in wanted.values() for key, _, idx in node_checks}


def _foldable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear) or is_hf_conv1d(m):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1:
        return m.padding == "valid" or all(p == 0 for p in m.padding)
    return False


def _decide(gm: fx.GraphModule, plan: ChannelPlan, pruned: np.ndarray, stats, notes: list[str]):
    """Unprune units whose removal would not be exact; return folds {module: {index: constant}}."""
    a = plan.analysis
    folds: dict[str, dict[int, tuple[float, int]]] = defaultdict(dict)
    for key, ((lo1, hi1, f1), (lo2, hi2, f2), idx) in stats.items():
        c = a.tracker.checks[key]
        const = (lo1 == hi1) & (lo2 == hi2) & (f1 == f2)
        zero = const & (f1 == 0)
        bad = np.nonzero(~zero.numpy())[0]
        module = submodule(gm, c.module) if c.module and len(bad) else None
        for j in bad.tolist():
            pos = int(idx[j])
            unit = a.unit[int(c.atoms[pos])]
            value = float(f1[j])
            if (
                c.kind == "fold"
                and bool(const[j])
                and _foldable(module)
                and folds[c.module].get(pos, (value,))[0] == value
            ):
                folds[c.module][pos] = (value, unit)
                continue
            if pruned[unit]:
                why = "a non-constant value" if not bool(const[j]) else f"the constant {value:g}"
                notes.append(f"kept a channel unit at the input of {c.node}: removing it would drop {why}")
            pruned[unit] = False
    return folds


def _apply_folds(gm: fx.GraphModule, folds, pruned: np.ndarray) -> int:
    """``bias += W[:, p] * c`` (summed over the kernel) for every pruned constant input ``p``."""
    count = 0
    with torch.no_grad():
        for name, entries in folds.items():
            m = submodule(gm, name)
            consts = {p: v for p, (v, unit) in entries.items() if pruned[unit]}
            if not consts:
                continue
            w = effective_weight(m).detach()
            if is_hf_conv1d(m):  # weight (in, out): as a Linear's (out, in)
                w = w.t()
            pos = torch.tensor(sorted(consts))
            vals = torch.tensor([consts[p] for p in sorted(consts)], dtype=w.dtype)
            cols = w.index_select(1, pos)
            delta = (cols.reshape(cols.shape[0], cols.shape[1], -1).sum(2) * vals).sum(1)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype))
            m.bias.add_(delta)
            count += len(consts)
    return count


def shrink_with_plan(gm: fx.GraphModule, plan: ChannelPlan, seed: int = 0, inputs: Sequence[Any] | None = None) -> bool:
    """Cut every member tensor of ``gm`` to the units ``plan`` keeps; True if anything was cut."""
    a = plan.analysis
    if graph_signature(gm) != a.signature:
        raise PreconditionError(
            "the channel plan is stale: the graph changed after channel_prune; run shrink right after channel_prune"
        )
    pruned = plan.pruned.copy()
    if not pruned.any():
        return False
    pair = model_inputs(gm, seed) if inputs is None else (tuple(inputs), model_inputs(gm, seed)[1])
    notes: list[str] = []
    folds = _decide(gm, plan, pruned, _probe(gm, plan, pruned, pair), notes)
    ties = tied_tensors(gm)
    cuts = _cuts(gm, a, pruned, ties)  # checks every tie is cut alike before anything changes
    streams = plan.streams if cuts else None
    masked = run_model(gm, streams.inputs) if streams is not None else None
    n_folded = _apply_folds(gm, folds, pruned)
    for module, module_cuts in cuts.values():
        slice_module(module, module_cuts)
    _retie(gm, ties)
    nodes = {n.name: n for n in gm.graph.nodes}
    kept = lambda atoms: ~pruned[a.unit[atoms.numpy()]]  # noqa: E731
    rewritten = [REWRITES.get(rw.kind)(nodes[rw.node], rw.data, kept) for rw in a.tracker.rewrites.values()]
    if any(rewritten):  # the generated code only changes when a constant did (the pass lints the graph)
        gm.recompile()
    _update_shapes(gm, a, kept)
    removed = int(pruned.sum())
    gm.meta.setdefault(REPORT_NOTES, []).append(
        f"shrink: removed {removed} channel units, folded {n_folded} constant channels into biases"
        + "".join(f"; {n}" for n in sorted(set(notes)))
    )
    gm.meta[CHANNEL_REPORT] = {"removed_units": removed, "folded": n_folded, "kept_for_exactness": notes}
    if streams is not None:
        streams.after_shrink(gm, masked)
        gm.meta[CHANNEL_REPORT]["streams"] = streams.to_dict()
        gm.meta[REPORT_NOTES].append(
            f"shrink: approximate streams: output deviation {streams.deviation:.3g} from the original, "
            f"{streams.deviation_approximation:.3g} from the masked model (relative L2, {streams.inputs_kind}); "
            "exactness check skipped; fine-tune afterwards"
        )
    log.info("shrink: removed %d units (%d folded, %d kept for exactness)", removed, n_folded, len(notes))
    return bool(cuts)


def _update_shapes(gm: fx.GraphModule, a, kept) -> None:
    """Shrink every recorded ``tensor_meta`` along its channel dim (no model run needed)."""
    for node in gm.graph.nodes:
        if TENSOR_META not in node.meta:
            continue
        if node.op == "get_attr":  # a parameter may be cut along dims its label does not carry: read it
            node.meta[TENSOR_META] = _attr_meta(gm, node, a.tracker.labels.get(node.name), kept)
        else:
            node.meta[TENSOR_META] = _resize(node.meta[TENSOR_META], a.tracker.labels.get(node.name), kept)


def _attr_meta(gm: fx.GraphModule, node: fx.Node, lab, kept):
    """The recorded shape of a ``get_attr`` read: the sliced tensor's own (contiguous) shape."""
    meta = node.meta[TENSOR_META]
    owner, _, attr = node.target.rpartition(".")
    value = getattr(submodule(gm, owner), attr, None)
    if not isinstance(meta, TensorMetadata) or not isinstance(value, torch.Tensor):
        return _resize(meta, lab, kept)
    return meta._replace(shape=value.shape, stride=tuple(value.stride()))


def _resize(meta, lab, kept):
    if isinstance(meta, TensorMetadata) and isinstance(lab, torch.Tensor):
        d = varying_dim(lab)
        if d is None:
            return meta
        shape = list(meta.shape)
        shape[d] = int(kept(lab.reshape(-1)).sum())
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * max(1, shape[i + 1])
        return meta._replace(shape=torch.Size(shape), stride=tuple(stride))
    if isinstance(meta, (tuple, list)) and isinstance(lab, (tuple, list)) and len(meta) == len(lab):
        items = [_resize(m, lb, kept) for m, lb in zip(meta, lab)]
        return type(meta)(*items) if hasattr(meta, "_fields") else type(meta)(items)  # namedtuple: positional
    return meta


def _cuts(gm: fx.GraphModule, a, pruned: np.ndarray, ties) -> dict[int, tuple[nn.Module, dict]]:
    """{id(module): (module, {(tensor, dim): kept indices})}, one entry per module object."""
    by_key: dict[tuple[str, str, int], np.ndarray] = {}
    for m in a.members:
        keep = ~pruned[a.unit[m.atoms.numpy()]]
        key = (m.owner, m.tensor, m.dim)
        if key in by_key and not np.array_equal(by_key[key], keep):
            raise PassError(f"inconsistent channel plan for {m.owner}.{m.tensor} dim {m.dim}")
        by_key[key] = keep
    keeps = {(id(submodule(gm, owner)), tensor, dim): keep for (owner, tensor, dim), keep in by_key.items()}
    _check_ties(gm, keeps, ties)
    cuts: dict[int, tuple[nn.Module, dict]] = {}
    for (owner, tensor, dim), keep in by_key.items():
        if not keep.all():
            module = submodule(gm, owner)
            cuts.setdefault(id(module), (module, {}))[1][(tensor, dim)] = torch.as_tensor(
                np.nonzero(keep)[0], dtype=torch.long
            )
    return cuts


def _check_ties(gm: fx.GraphModule, keeps: dict, ties: list[list[tuple[str, str]]]) -> None:
    """Raise (before any change) if the plan would cut the holders of one tied tensor differently."""
    for holders in ties:
        mods = [submodule(gm, path) for path, _ in holders]
        value = getattr(mods[0], holders[0][1])
        for dim in range(value.ndim):
            kept = [keeps.get((id(mod), attr, dim)) for mod, (_, attr) in zip(mods, holders)]
            if all(k is None for k in kept):
                continue
            kept = [np.ones(value.shape[dim], dtype=bool) if k is None else k for k in kept]
            for (path, attr), k in zip(holders[1:], kept[1:]):
                if not np.array_equal(kept[0], k):
                    first, other = (f"{p}.{t}" if p else t for p, t in (holders[0], (path, attr)))
                    raise PassError(
                        f"shrink would untie '{first}' and '{other}' (one tensor): the channel plan keeps "
                        f"different indices of its dim {dim} ({int(kept[0].sum())} vs {int(k.sum())} of "
                        f"{len(k)}); nothing was changed. Run channel_prune on the model as it is tied now"
                    )


def _retie(gm: fx.GraphModule, ties: list[list[tuple[str, str]]]) -> None:
    """Give every holder of a tied tensor the one tensor its first holder now holds (all were cut alike)."""
    for (path0, attr0), *rest in ties:
        value = getattr(submodule(gm, path0), attr0)
        for path, attr in rest:
            mod = submodule(gm, path)
            (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = value
