"""Whole attention heads as channel units: ``channel_prune(attention="heads")``.

A *head split* is a reshape that splits one dim ``C`` into factors ``(..., H, D)`` (``x.view(B, T, H, D)``,
``qkv.reshape(B, N, 3, H, D)``, ``x.unflatten(-1, (H, -1))``) whose output reaches an attention contraction
(``sdpa``, ``matmul``/``bmm``, ``einsum``) through shape and elementwise ops only. By default a label tensor keeps
its innermost varying factor, so a unit is one within-head dim across all heads (``head_dims``). With ``heads``
the split unites the factors inside a head (``D``) instead and keeps ``H``: a unit is a whole head, i.e. the q, k
and v rows of that head (the ``3`` of a packed qkv is united with it) and, through the contraction rules, the
o-projection columns and every per-head tensor added to or multiplied into the scores (relative position bias
tables, cosine-attention logit scales). Reshapes to ``(B, T, H, D)`` then shrink their ``H`` (literal sizes are
rewritten; ``-1`` is inferred). Uniting is always safe, so a wrongly detected split only coarsens the units.

Grouped-query attention: a key/value head repeated for its query heads (``repeat_kv``'s expand + reshape, or
``sdpa(enable_gqa=True)``) is united with all of them, so whole GQA groups (one kv head and its query heads)
are pruned together; the query-to-kv head ratio stays the same.

``both``: whole heads first, at ``r_heads = 1 - sqrt(1 - ratio)`` (other groups at their own ratio), removed by an
exact shrink inside ``channel_prune``; then within-head dims of the kept heads are zeroed at the ratio that brings
each attention group to about ``1 - ratio`` of its channels (``prune_heads_then_dims``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.fx as fx

from sparsifx.meta_keys import CHANNEL_OUTCOME, CHANNEL_PLAN, REPORT_NOTES, TENSOR_META

ATTENTION_MODES = ("head_dims", "heads", "both")
META_KEY = "channel_head_splits"  # gm.meta during a heads analysis: {reshape node name: dims united in a head}
RESHAPE_METHODS = ("view", "reshape", "unflatten")
_SEARCH_LIMIT = 64  # nodes visited from a split before giving up


def keep_heads(cx, node: fx.Node, full: torch.Tensor) -> torch.Tensor:
    """Labels of reshape ``node`` (``full``: before normalisation): in a heads analysis, a head split unites the
    dims inside a head so that the head dim is the one left varying."""
    inner = cx.gm.meta.get(META_KEY, {}).get(node.name)
    for d in inner or ():
        if full.shape[d] > 1:
            first = full.narrow(d, 0, 1)
            cx.t.union(full, first)
            full = first
    return full


@contextmanager
def head_units(gm: fx.GraphModule, on: bool) -> Iterator[dict[str, tuple[int, ...]]]:
    """Within the block, ``analyze_channels(gm)`` makes whole heads the units (``on``)."""
    splits = find_head_splits(gm) if on else {}
    if not splits:
        yield splits
        return
    gm.meta[META_KEY] = splits
    try:
        yield splits
    finally:
        gm.meta.pop(META_KEY, None)


def find_head_splits(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """{reshape node: its output dims inside a head} for every head split of ``gm`` (see the module doc)."""
    out = {}
    for node in gm.graph.nodes:
        if not _is_reshape(gm, node):
            continue
        inner = _split_inner(node)
        if inner is not None and _reaches_attention(gm, node):
            out[node.name] = inner
    return out


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in (torch.reshape, torch.unflatten)
    return False


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get(TENSOR_META) if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _split_inner(node: fx.Node) -> tuple[int, ...] | None:
    """The output dims inside a head when ``node`` splits one input dim into ``(..., H, D)`` (H, D > 1)."""
    src = node.args[0] if node.args else node.kwargs.get("input")
    a, b = _shape(src), _shape(node)
    if a is None or b is None or len(b) <= len(a):
        return None
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if i == len(a):
        return None
    j = len(b) - (len(a) - i - 1)  # factors b[i:j] of a[i]; the dims after them are a's
    if j - i < 2 or tuple(b[j:]) != tuple(a[i + 1 :]) or math.prod(b[i:j]) != a[i]:
        return None
    if b[j - 2] <= 1 or b[j - 1] <= 1:
        return None
    return (j - 1,)


def _reaches_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output flows into an attention contraction through shape/elementwise ops only."""
    from . import rules_attention as ra
    from . import rules_elementwise as re_
    from . import rules_shape as rs
    from .containers import is_container_op
    from .rules_base import find_rule

    through = {
        rs.reshape,
        rs.expand,
        rs.permute,
        rs.transpose,
        rs.cat,
        rs.stack,
        rs.split,
        rs.unbind,
        rs.getitem,
        re_.unary,
        re_.unary_module,
        re_.elementwise,
        re_.softmax,
        ra.normalize,
    }
    targets = {ra.sdpa, ra.matmul, ra.einsum}
    frontier, seen = [node], {node}
    while frontier and len(seen) < _SEARCH_LIMIT:
        for user in frontier.pop().users:
            if user in seen or user.op not in ("call_function", "call_method", "call_module"):
                continue
            seen.add(user)
            rule = find_rule(gm, user)
            if rule in targets:
                return True
            if rule in through or is_container_op(user):
                frontier.append(user)
    return False


def attention_units(analysis, splits) -> set[int]:
    """Unit ids carried by the outputs of the head splits ``splits`` (node names) in ``analysis``."""
    out: set[int] = set()
    for name in splits:
        lab = analysis.tracker.labels.get(name)
        if isinstance(lab, torch.Tensor):
            out.update(analysis.unit[lab.reshape(-1).numpy()].tolist())
    return out


class _Stage:
    """Group ratios of one ``both`` stage: attention groups (units of a head split) get ``attention(group)``,
    other groups ``other(ratio)``."""

    def __init__(self, gm: fx.GraphModule, attention, other):
        self.gm, self.attention, self.other = gm, attention, other
        self._units: tuple[int, set[int]] | None = None

    def is_attention(self, analysis, group) -> bool:
        if self._units is None or self._units[0] != id(analysis):
            self._units = (id(analysis), attention_units(analysis, find_head_splits(self.gm)))
        return not self._units[1].isdisjoint(group.units.tolist())

    def __call__(self, analysis, group, ratio: float) -> float | None:
        return self.attention(group) if self.is_attention(analysis, group) else self.other(ratio)


def prune_heads_then_dims(prune, gm: fx.GraphModule):
    """``attention="both"``: prune whole heads at ``1 - sqrt(1 - ratio)`` (other groups at their own ratio) and
    remove them (an exact ``shrink``), then zero within-head dims of the kept heads so that each attention group
    keeps about ``1 - ratio`` of its channels. ``gm.meta["channel_plan"]`` is the second stage's."""
    import copy
    import dataclasses

    from sparsifx.pass_base import PassResult

    from .shrink import shrink_with_plan

    keep = 1.0 - prune.ratio
    first = copy.copy(prune)
    first.attention = "heads"
    first._stage = _Stage(gm, lambda group: 1.0 - math.sqrt(keep), lambda ratio: ratio)
    modified = first.call(gm).modified
    plan, outcome1 = gm.meta.pop(CHANNEL_PLAN), gm.meta[CHANNEL_OUTCOME]
    kept_heads = {}  # producer layer -> fraction of its heads kept
    for group in plan.analysis.groups:
        if first._stage.is_attention(plan.analysis, group):
            frac = 1.0 - float(plan.pruned[group.units].mean())
            kept_heads.update({name: frac for name in group.modules})
    modified = shrink_with_plan(gm, plan) or modified

    def dims_ratio(group) -> float | None:
        frac = min((kept_heads.get(name, 1.0) for name in group.modules), default=1.0)
        return max(0.0, 1.0 - keep / frac) if frac > keep else None

    second = copy.copy(prune)
    second.attention = "head_dims"
    second._stage = _Stage(gm, dims_ratio, lambda ratio: None)
    modified = second.call(gm).modified or modified
    outcome2 = gm.meta[CHANNEL_OUTCOME]
    removed = outcome1.removed + outcome2.removed
    outcome = dataclasses.replace(
        outcome1, removed=removed, achieved=removed / outcome1.channels if outcome1.channels else 0.0
    )
    gm.meta[CHANNEL_OUTCOME] = outcome
    notes = gm.meta.setdefault(REPORT_NOTES, [])
    notes.append(
        f"channel_prune attention='both': whole heads removed first ({outcome1.removed} channels), then "
        f"{outcome2.removed} within-head channels zeroed"
    )
    prune._judge(outcome, notes)
    return PassResult(gm, modified)
