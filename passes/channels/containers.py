"""Tuples, lists and dicts of tensors in the graph, and the rule that outputs keep every channel.

A node whose recorded value (``node.meta["tensor_meta"]``) is a container and whose target is a plain
Python operator or container class (``(logits,) + outputs[1:]``, ``outputs[1:]``, ``pair * 2``,
``Output(logits, hidden)``) only rearranges tensors: its
labels are the operator applied to its inputs' labels, so channels stay linked across it. The result must
be made of the very label tensors that went in (a pure rearrangement) and match the recorded structure;
anything else is a barrier (its inputs stay whole).

Outputs are sacred: ``protect_outputs`` walks back from the graph output through the containers written
in its args and fixes the channels of every tensor it reaches. A resolved container node (a rearrangement
above, ``split``, an opaque leaf's tuple) contributes its labels, which are exactly the tensors it holds; a
non-tensor node (``h.shape[1]``) or a container whose labels could not be resolved is walked through, so
the tensors it was computed from are fixed too (fail safe).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.fx as fx

from sparsifx.meta_keys import TENSOR_META

from .rules_base import UNKNOWN, RuleContext
from .tracker import tensor_leaves

PYTHON_MODULES = frozenset({"_operator", "operator", "math", "builtins"})


def is_python_op(node: fx.Node) -> bool:
    return node.op == "call_function" and (getattr(node.target, "__module__", None) or "") in PYTHON_MODULES


def is_container(meta: Any) -> bool:
    """Whether a recorded ``tensor_meta`` stands for a container (not one tensor, not absent)."""
    return meta is not None and not hasattr(meta, "shape")


def is_container_op(node: fx.Node) -> bool:
    """A Python operator or container class (a namedtuple) that builds a container of tensors."""
    builds = is_python_op(node) or (
        node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, (tuple, list, dict))
    )
    return builds and is_container(node.meta.get(TENSOR_META))


def container_value(cx: RuleContext, node: fx.Node) -> Any:
    """The operator applied to its inputs' labels; a barrier unless that purely rearranges them."""
    args, kwargs = cx.value(node.args), cx.value(node.kwargs)
    try:
        out = node.target(*args, **kwargs)
    except Exception:  # an operand the analysis could not evaluate (UNKNOWN): follow nothing
        out = UNKNOWN
    inputs = {id(t) for t in tensor_leaves((args, kwargs))}
    if _matches(out, node.meta[TENSOR_META]) and all(id(t) in inputs for t in tensor_leaves(out)):
        return out
    cx.t.barrier(node, "container operation the analysis cannot follow", [args, kwargs])
    return cx.fixed(node)


def protect_outputs(cx: RuleContext, output: fx.Node) -> None:
    """Fix the channels of every tensor that reaches ``output``, through any container."""
    seen: set[fx.Node] = set()
    stack = list(_nodes_in(output.args))
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        cx.t.fix(cx.env.get(node))
        if _walks_through(cx, node):
            stack.extend(_nodes_in((node.args, node.kwargs)))


def _walks_through(cx: RuleContext, node: fx.Node) -> bool:
    """Whether the tensors behind ``node``'s value are its inputs, not its labels: a non-tensor value
    (sizes change with its inputs' channel counts) or a container whose labels were not resolved."""
    if node.op in ("placeholder", "get_attr"):
        return False
    meta = node.meta.get(TENSOR_META)
    return meta is None or (is_container(meta) and not _matches(cx.env.get(node, UNKNOWN), meta))


def _nodes_in(args: Any) -> Iterator[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return iter(found)


def _matches(value: Any, meta: Any) -> bool:
    """Whether label ``value`` has the structure of the recorded ``meta`` (same nesting, tensor ranks)."""
    if hasattr(meta, "shape"):
        return isinstance(value, torch.Tensor) and value.ndim == len(meta.shape)
    if isinstance(meta, (tuple, list)):
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(meta)
            and all(_matches(v, m) for v, m in zip(value, meta))
        )
    if isinstance(meta, dict):
        return (
            isinstance(value, dict)
            and value.keys() == meta.keys()
            and all(_matches(value[k], m) for k, m in meta.items())
        )
    return not isinstance(value, torch.Tensor) and value is not UNKNOWN
