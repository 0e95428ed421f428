"""The channel-rule registry and the context a rule works with.

A rule maps the labels of a node's inputs to the labels of its output and records coupling on the
``Tracker``. Keys: ``fn:<module>.<name>`` (call_function), ``method:<name>`` (call_method),
``module:<module>.<Class>`` (call_module; looked up along the class MRO). Register with
``@channel_rule(torch.cat, "method:cat", nn.Conv2d, ...)``: functions, classes or key strings.

``PARAM_DIMS`` says which dim of a module's parameter carries its channels when the graph reads it as a
tensor (``get_attr``): ``param_channel_dim(0, "weight", nn.Conv2d)`` (default: the last dim larger than 1).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from sparsifx.meta_keys import NN_MODULE_STACK, TENSOR_META
from sparsifx.module_utils import submodule
from sparsifx.registry import Registry, type_key, type_registry_lookup

from .tracker import FIXED, Tracker

CHANNEL_RULES: Registry[Callable] = Registry("channel rule")
PARAM_DIMS: Registry[int] = Registry("parameter channel dim")


def fn_key(fn: Any) -> str:
    try:
        return f"fn:{_get_qualified_name(fn)}"
    except Exception:  # objects fx cannot name (partials, callables without __name__)
        mod = getattr(fn, "__module__", None) or "torch"
        return f"fn:{mod}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"


MODULE_PREFIX = "module:"  # type keys: "module:" + sparsifx.registry.type_key(cls)


def rule_key(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, type):
        return f"{MODULE_PREFIX}{type_key(obj)}"
    return fn_key(obj)


def channel_rule(*targets: Any) -> Callable[[Callable], Callable]:
    """Register ``rule(cx, node) -> labels`` for every target (function, module class or key)."""

    def add(rule: Callable) -> Callable:
        for t in targets:
            CHANNEL_RULES.register(rule_key(t), rule)
        return rule

    return add


def param_channel_dim(dim: int, tensor: str, *types: type) -> None:
    """Parameter ``tensor`` of modules of ``types`` (and subclasses) carries its channels along ``dim``."""
    for t in types:
        PARAM_DIMS.register(f"{rule_key(t)}.{tensor}", dim)


def find_param_dim(owner_type: type, tensor: str) -> int | None:
    return type_registry_lookup(PARAM_DIMS, owner_type, prefix=MODULE_PREFIX, suffix=f".{tensor}")


def owner_type(gm: fx.GraphModule, node: fx.Node, path: str) -> type:
    """The class of module ``path`` as the model had it: a module traced into is only a plain ``nn.Module``
    holding its tensors in ``gm``; its class is in the ``nn_module_stack`` of the nodes it ran."""
    for entry in (node.meta.get(NN_MODULE_STACK) or {}).values():
        if isinstance(entry, tuple) and len(entry) == 2 and entry[0] == path and isinstance(entry[1], type):
            return entry[1]
    return type(submodule(gm, path))


def find_rule(gm: fx.GraphModule, node: fx.Node) -> Callable | None:
    if node.op == "call_function":
        key = fn_key(node.target)
        return CHANNEL_RULES.get(key) if key in CHANNEL_RULES else None
    if node.op == "call_method":
        key = f"method:{node.target}"
        return CHANNEL_RULES.get(key) if key in CHANNEL_RULES else None
    if node.op == "call_module":
        return type_registry_lookup(CHANNEL_RULES, submodule(gm, node.target), prefix=MODULE_PREFIX)
    return None


class Unknown:
    """A non-tensor value the analysis cannot evaluate statically."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = Unknown()


class RuleContext:
    """What a rule sees: the tracker, the module, input labels / static values and real shapes."""

    def __init__(self, gm: fx.GraphModule, tracker: Tracker):
        self.gm, self.t = gm, tracker
        self.env: dict[fx.Node, Any] = {}

    # values ---------------------------------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        return fx.node.map_aggregate(arg, lambda a: self.env.get(a, UNKNOWN) if isinstance(a, fx.Node) else a)

    def _arg(self, node: fx.Node, i: int, key: str | None, default: Any = None) -> Any:
        if i is not None and i < len(node.args):
            return node.args[i]
        if key is not None and key in node.kwargs:
            return node.kwargs[key]
        return default

    def inp(self, node: fx.Node, i: int = 0, key: str | None = None, default: Any = None) -> Any:
        """The label tensor / static value of argument ``i`` (or keyword ``key``)."""
        return self.value(self._arg(node, i, key, default))

    def inshape(self, node: fx.Node, i: int = 0, key: str | None = None) -> tuple[int, ...] | None:
        return shape_of(self._arg(node, i, key))

    def module(self, node: fx.Node) -> torch.nn.Module:
        return submodule(self.gm, node.target)

    # labels ---------------------------------------------------------------------------------------------
    def fixed(self, node: fx.Node) -> Any:
        """All-FIXED labels shaped like ``node``'s output (tuple-aware)."""
        return _fixed_like(node.meta.get(TENSOR_META))


def shape_of(arg: Any) -> tuple[int, ...] | None:
    if isinstance(arg, fx.Node):
        meta = arg.meta.get(TENSOR_META)
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape)
    return None


def out_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get(TENSOR_META)
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _fixed_like(meta: Any) -> Any:
    if meta is None:
        return UNKNOWN
    if hasattr(meta, "shape"):
        return torch.full((1,) * len(meta.shape), FIXED, dtype=torch.long)
    if isinstance(meta, tuple) and hasattr(meta, "_fields"):  # a namedtuple
        return type(meta)(*(_fixed_like(m) for m in meta))
    if isinstance(meta, (tuple, list)):
        return type(meta)(_fixed_like(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _fixed_like(v) for k, v in meta.items()}
    return UNKNOWN


def is_label(v: Any) -> bool:
    return isinstance(v, torch.Tensor)
