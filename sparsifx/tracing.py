"""``trace``: symbolic tracing with leaf modules, opaque-leaf fallback and shape recording (``record_shapes``:
the ``shapes`` analysis, ``sparsifx.analysis.shapes``)."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from .analysis.shapes import record_shapes  # noqa: F401  (re-exported: the 'shapes' analysis records them)
from .errors import TraceError
from .meta_keys import LEAF_TYPES as LEAF_TYPES_KEY
from .meta_keys import OPAQUE_LEAVES
from .module_classes import record_module_classes
from .module_utils import clone_module

log = logging.getLogger(__name__)

# Module classes that are always leaves (sparsifx's own layers register here).
LEAF_TYPES: set[type] = set()
MAX_OPAQUE_RETRIES = 64


def register_leaf_type(cls: type) -> type:
    """Class decorator: tracing never enters modules of this class."""
    LEAF_TYPES.add(cls)
    return cls


class SparsifxTracer(fx.Tracer):
    """An ``fx.Tracer`` that keeps given module paths and types as leaves and remembers which
    module it was inside when tracing failed."""

    def __init__(self, leaf_paths: Iterable[str] = (), leaf_types: Iterable[type] = ()):
        super().__init__()
        self.leaf_paths = set(leaf_paths)
        self.leaf_types = tuple(LEAF_TYPES | set(leaf_types))
        self._sparsifx_stack: list[str] = []
        self.failed_in: list[str] | None = None
        self.control_flow_node: tuple[fx.Node, str] | None = None  # the proxy Python needed a value of

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def to_bool(self, obj: fx.Proxy) -> bool:
        self.control_flow_node = self.control_flow_node or (obj.node, "decides Python control flow")
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy):
        self.control_flow_node = self.control_flow_node or (obj.node, "is iterated over")
        return super().iter(obj)

    def keys(self, obj: fx.Proxy):
        self.control_flow_node = self.control_flow_node or (obj.node, "is unpacked with **")
        return super().keys(obj)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self._sparsifx_stack.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self._sparsifx_stack)
            raise
        finally:
            self._sparsifx_stack.pop()


def _last_node(tracer: SparsifxTracer) -> str:
    graph = getattr(tracer, "graph", None)
    nodes = list(graph.nodes) if graph is not None else []
    return nodes[-1].format_node() if nodes else "<no node created>"


def _inputs_behind(node: fx.Node) -> list[fx.Node]:
    """The placeholders ``node`` is computed from."""
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n)
        stack.extend(n.all_input_nodes)
    return sorted(found, key=lambda n: n.name)


def _remedy(tracer: SparsifxTracer) -> str:
    """What to do about a top-level tracing failure, naming the node and the inputs it came from."""
    generic = "wrap the construct in a submodule and list it in leaf_modules, or decorate the helper with torch.fx.wrap"
    if tracer.control_flow_node is None:
        return (
            f"Failed after node {_last_node(tracer)}. Remedies: pass concrete_args for arguments that "
            f"drive control flow, {generic}."
        )
    node, what = tracer.control_flow_node
    inputs = _inputs_behind(node)
    names = ", ".join(f"'{p.target}'" for p in inputs) or "no input (a constant or a parameter)"
    example = ", ".join(f"'{p.target}': ..." for p in inputs) or "..."
    return (
        f"Node '{node.name}' ({node.format_node()}) {what}; it is computed from input {names}. If that "
        f"input is an option or a flag, fix it with concrete_args={{{example}}} (sparsify(..., "
        f"concrete_args=...) or trace(..., concrete_args=...)); if it is data (a tensor's size or "
        f"values), {generic}."
    )


def _trace_once(
    model, leaf_paths, leaf_types, concrete_args
) -> tuple[fx.GraphModule | None, Exception | None, SparsifxTracer]:
    tracer = SparsifxTracer(leaf_paths, leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... depending on the construct
        return None, exc, tracer
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name), None, tracer


def trace(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    copy_model: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule``.

    ``leaf_modules`` are module paths or classes kept opaque. ``concrete_args`` fix arguments at trace time
    (flags that drive control flow); the result no longer takes them (their values are bound in the graph). A
    submodule that symbolic tracing
    cannot handle is retried as an opaque leaf; the paths end up in ``gm.meta["opaque_leaves"]``.
    ``gm.meta["module_classes"]`` records the original class of every kept module path (``module_classes``:
    a module traced into stays only as a bare ``nn.Module`` container).
    With ``example_inputs``, shapes are recorded in ``node.meta["tensor_meta"]``. The model is
    deep-copied first unless ``copy_model=False``, so the result never aliases the user's weights.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace needs a torch.nn.Module, got {type(model).__name__}")
    if copy_model:
        model = clone_module(model)
    leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
    leaf_types = {m for m in leaf_modules if isinstance(m, type)}
    opaque: list[str] = []
    for _ in range(MAX_OPAQUE_RETRIES):
        gm, exc, tracer = _trace_once(model, leaf_paths | set(opaque), leaf_types, concrete_args)
        if gm is not None:
            break
        culprit = (tracer.failed_in or [""])[-1]
        if not culprit:
            raise TraceError(
                f"cannot trace model {type(model).__name__}: {type(exc).__name__}: {exc} "
                f"(at the top-level forward). {_remedy(tracer)}"
            ) from exc
        log.info("submodule %s is not traceable (%s); keeping it as an opaque leaf", culprit, exc)
        opaque.append(culprit)
    else:
        raise TraceError(f"gave up after {MAX_OPAQUE_RETRIES} opaque-leaf retries: {opaque[-5:]}")
    _bind_concrete_args(gm, concrete_args or {})
    gm.meta[OPAQUE_LEAVES] = opaque
    gm.meta[LEAF_TYPES_KEY] = tuple(leaf_types)
    record_module_classes(model, gm)
    if example_inputs is not None:
        record_shapes(gm, example_inputs)
    return gm


def _bind_concrete_args(gm: fx.GraphModule, concrete_args: dict[str, Any]) -> None:
    """Drop the placeholders fx keeps for concrete (non-tensor) arguments and use their values instead, so
    the traced module takes only the remaining inputs (fx's guards on those values become constant)."""
    changed = False
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        name = node.target.lstrip("*")
        if name not in concrete_args:
            name = re.sub(r"_\d+$", "", name)  # fx renames a concrete argument's placeholder (flag -> flag_1)
        if name not in concrete_args or _has_placeholder_marker(concrete_args[name]):
            continue
        value = concrete_args[name]
        for user in list(node.users):
            user.args = fx.node.map_aggregate(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _has_placeholder_marker(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda a: found.append(a is fx.PH) or a)
    return any(found)


def retrace(gm: fx.GraphModule) -> fx.GraphModule:
    """Trace an existing GraphModule again with the same leaves (keeps opaque leaves opaque; bare containers
    keep the class ``gm.meta["module_classes"]`` recorded for them)."""
    leaves = list(gm.meta.get(OPAQUE_LEAVES, [])) + list(gm.meta.get(LEAF_TYPES_KEY, ()))
    new = trace(gm, leaf_modules=leaves, copy_model=False)
    new.meta.update({k: v for k, v in gm.meta.items() if k not in new.meta})
    return new
