"""``trace``: symbolic tracing with leaf modules, opaque-leaf fallback and shape recording."""
from __future__ import annotations

import contextlib
import io
import logging
import re
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ExampleInputError, TraceError
from .module_classes import record_module_classes
from .module_utils import clone_module, preserve_training_flags
from .shape_prop import HeavyOpsOnMeta

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
    generic = ("wrap the construct in a submodule and list it in leaf_modules, or decorate the helper with "
               "torch.fx.wrap")
    if tracer.control_flow_node is None:
        return f"Failed after node {_last_node(tracer)}. Remedies: pass concrete_args for arguments that " \
               f"drive control flow, {generic}."
    node, what = tracer.control_flow_node
    inputs = _inputs_behind(node)
    names = ", ".join(f"'{p.target}'" for p in inputs) or "no input (a constant or a parameter)"
    example = ", ".join(f"'{p.target}': ..." for p in inputs) or "..."
    return (f"Node '{node.name}' ({node.format_node()}) {what}; it is computed from input {names}. If that "
            f"input is an option or a flag, fix it with concrete_args={{{example}}} (sparsify(..., "
            f"concrete_args=...) or trace(..., concrete_args=...)); if it is data (a tensor's size or "
            f"values), {generic}.")


def _trace_once(model, leaf_paths, leaf_types, concrete_args) -> tuple[fx.GraphModule | None, Exception | None,
                                                                        SparsifxTracer]:
    tracer = SparsifxTracer(leaf_paths, leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... depending on the construct
        return None, exc, tracer
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name), None, tracer


def trace(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None,
          leaf_modules: Iterable[str | type] = (), concrete_args: dict[str, Any] | None = None,
          copy_model: bool = True) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule``.

    ``leaf_modules`` are module paths or classes kept opaque. ``concrete_args`` fix arguments at trace time
    (flags that drive control flow); the result no longer takes them (their values are bound in the graph). A submodule that symbolic tracing
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
            raise TraceError(f"cannot trace model {type(model).__name__}: {type(exc).__name__}: {exc} "
                             f"(at the top-level forward). {_remedy(tracer)}") from exc
        log.info("submodule %s is not traceable (%s); keeping it as an opaque leaf", culprit, exc)
        opaque.append(culprit)
    else:
        raise TraceError(f"gave up after {MAX_OPAQUE_RETRIES} opaque-leaf retries: {opaque[-5:]}")
    _bind_concrete_args(gm, concrete_args or {})
    gm.meta["opaque_leaves"] = opaque
    gm.meta["leaf_types"] = tuple(leaf_types)
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


class _RemembersFailure:
    """Interpreter mixin: ``failed_node`` is the node whose execution raised (``None`` while none has)."""
    failed_node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception:
            self.failed_node = self.failed_node or n
            raise


class _FastShapes(_RemembersFailure, HeavyOpsOnMeta):
    pass


class _RealShapes(_RemembersFailure, ShapeProp):
    pass


def record_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``gm`` once (eval, no grad) and store ``tensor_meta`` on every node.

    Heavy ops compute shapes only (``shape_prop.HeavyOpsOnMeta``); if that run raises (an op that
    rejects the zeros it then sees), the plain ``ShapeProp`` runs the model for real. Inputs the model
    rejects raise ``ExampleInputError`` naming their shapes and the node and module that rejected them.
    Every submodule's ``training`` flag is as it was afterwards (frozen BatchNorms stay frozen)."""
    fast, real = _FastShapes(gm), _RealShapes(gm)
    with preserve_training_flags(gm), torch.no_grad():
        gm.eval()
        try:
            # ShapeProp prints the traceback of a failing node before it raises: the failure is reported below
            with contextlib.redirect_stderr(io.StringIO()):
                fast.propagate(*example_inputs)
            return
        except Exception as exc:  # noqa: BLE001 - retried for real below, and logged
            log.info("shape propagation with heavy ops on meta failed (%s: %s); running the model for real",
                     type(exc).__name__, exc)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                real.propagate(*example_inputs)
        except Exception as exc:
            raise _rejection(gm, example_inputs, real.failed_node, exc) from exc


def _describe_inputs(inputs: Sequence[Any]) -> str:
    parts = [f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor)
             else type(x).__name__ for x in inputs]
    return "[" + ", ".join(parts) + "]"


def _rejection(gm: fx.GraphModule, inputs: Sequence[Any], node: fx.Node | None,
               exc: Exception) -> ExampleInputError:
    """Which node and module rejected the example inputs, and torch's own reason (not ShapeProp's wrapper)."""
    cause = exc.__cause__ if exc.__cause__ is not None and "ShapeProp error" in str(exc) else exc
    text = str(cause).strip()
    reason = f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
    shapes, where, module = _describe_inputs(inputs), "the model", None
    if node is not None:
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if node.op == "call_module":
            module = node.target
            where = f"module '{module}' ({type(gm.get_submodule(module)).__name__}, node '{node.name}')"
        else:
            module = stack[-1][0] if stack else None
            where = f"node '{node.name}' ({node.op} {_target_name(node)})"
            where += f" in module '{module}'" if module else ""
    return ExampleInputError(
        f"the example inputs {shapes} are rejected by {where}: {reason}. Pass inputs of the shapes and dtypes "
        "the model's forward accepts (as in model(*example_inputs)).",
        shapes, node.name if node is not None else None, module)


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def retrace(gm: fx.GraphModule) -> fx.GraphModule:
    """Trace an existing GraphModule again with the same leaves (keeps opaque leaves opaque; bare containers
    keep the class ``gm.meta["module_classes"]`` recorded for them)."""
    leaves = list(gm.meta.get("opaque_leaves", [])) + list(gm.meta.get("leaf_types", ()))
    new = trace(gm, leaf_modules=leaves, copy_model=False)
    new.meta.update({k: v for k, v in gm.meta.items() if k not in new.meta})
    return new

