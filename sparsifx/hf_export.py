"""``trace_hf(..., method="export")``: capture with ``torch.export`` and fold leaf layers back into modules.

``torch.export.export(strict=False)`` runs the model's Python for real and records a flat ATen graph in which
every node knows, through ``nn_module_stack``, which module calls it ran inside. The ATen nodes of one call
of a leaf module (a ``torch.nn`` layer, transformers' ``Conv1D``, a registered leaf type or a
``leaf_modules`` entry) become one ``call_module`` node on the model's own module, provided the call has a
single tensor input and a single output and reads only that module's tensors (a layer that calls its own
weight twice, or a subclass with its own ``forward`` signature, stays inlined and is listed). The rest stays
ATen (``aten.view``, ``aten.scaled_dot_product_attention``...), which channel rules do not know.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .errors import TraceError
from .hf_tracing import Captured, HFCall, strip, strip_stack
from .meta_keys import NN_MODULE_STACK, STACK_TRACE, TORCH_FN, VAL
from .tracing import LEAF_TYPES

_META_KEPT = (NN_MODULE_STACK, STACK_TRACE, TORCH_FN, VAL)


def export_graph(call: HFCall, tensors: tuple, leaf_paths: set[str], leaf_types: tuple) -> Captured:
    try:
        ep = torch.export.export(call, tensors, strict=False)
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependentSymNode, TypeError...)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TraceError(
            f"cannot trace {type(call.model).__name__} with trace_hf(method='export'): torch.export "
            f"failed ({type(exc).__name__}: {first}). Try: pass every input the forward needs as a "
            "tensor in example_inputs and options as plain values, or method='fx'."
        ) from exc
    src = ep.module()
    graph = _rebuild(src, call.names, ep.call_spec.out_spec)
    types = tuple(LEAF_TYPES) + tuple(leaf_types)
    inlined = _fold_leaves(graph, call.model, lambda path, m: path in leaf_paths or _is_leaf(m, types))
    for node in graph.nodes:
        node.meta.pop(VAL, None)  # fake tensors: not copyable; shapes are recorded afterwards
    constants = {
        n.target: _attr(src, n.target)
        for n in graph.nodes
        if n.op == "get_attr" and _attr(call.model, n.target, None) is None
    }
    return Captured(graph, [], constants, inlined)


def _is_leaf(m: nn.Module | None, types: tuple) -> bool:
    """fx's leaves (``torch.nn`` layers) and registered types, where the class keeps that type's ``forward``."""
    if m is None or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if type(m).__module__.startswith("torch.nn"):
        return True
    return any(isinstance(m, t) and type(m).forward is t.forward for t in types)


def _rebuild(src: fx.GraphModule, names: list[str], out_spec: pytree.TreeSpec) -> fx.Graph:
    """The exported graph over the model's own paths: placeholders named after the inputs, export's guard
    call and unused reads dropped, outputs in their original (tuple) structure."""
    graph, env, inputs = fx.Graph(), {}, iter(names)
    for node in src.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(next(inputs))
        elif node.op == "call_module" or (node.op == "get_attr" and not node.users):
            continue  # call_module: export's _guards_fn only (the model's own modules are inlined)
        elif node.op == "output":
            flat = [fx.map_arg(a, env.__getitem__) for a in node.args[0]]
            graph.output(pytree.tree_unflatten(flat, out_spec))
        else:
            env[node] = new = graph.node_copy(node, env.__getitem__)
            if new.op == "get_attr":
                new.target = strip(new.target)
        if node.op != "output" and node in env:
            env[node].meta = {k: v for k, v in node.meta.items() if k in _META_KEPT}
            strip_stack(env[node])
    return graph


def _fold_leaves(graph: fx.Graph, model: nn.Module, is_leaf) -> list[str]:
    """Replace each call of a leaf module (its run of ATen nodes) by one ``call_module``; returns the paths of
    the calls left inlined."""
    regions: dict[str, tuple[str, list[fx.Node]]] = {}
    cache: dict[str, bool] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _) in node.meta.get(NN_MODULE_STACK, {}).items():
            if path not in cache:
                cache[path] = is_leaf(path, _attr(model, path, None))
            if cache[path]:
                regions.setdefault(key, (path, []))[1].append(node)
                break
    return [path for path, nodes in regions.values() if not _fold(graph, model, path, nodes)]


def _fold(graph: fx.Graph, model: nn.Module, path: str, nodes: list[fx.Node]) -> bool:
    """Fold one call if it is one: one tensor input from outside, one value used outside, and only the module's
    own tensors read, each at most once (two calls merged would read them twice)."""
    module, inside = _attr(model, path), set(nodes)
    own = {id(t) for t in (*module.parameters(), *module.buffers())}
    inputs, reads = [], []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in inside:
                continue
            if arg.op == "get_attr":
                reads.append(arg.target)
                if id(_attr(model, arg.target, None)) not in own:
                    return False
            elif isinstance(arg.meta.get(VAL), torch.Tensor):
                inputs += [arg] if arg not in inputs else []
            elif not isinstance(arg.meta.get(VAL), (torch.SymInt, int)):
                return False
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1 or len(reads) != len(set(reads)):
        return False
    out = outputs[0]
    with graph.inserting_after(out):
        call = graph.call_module(path, (inputs[0],))
    stack = out.meta.get(NN_MODULE_STACK, {})
    keys = list(stack)
    depth = next(i for i, k in enumerate(keys) if stack[k][0] == path) + 1
    call.meta = {
        NN_MODULE_STACK: {k: stack[k] for k in keys[:depth]},
        STACK_TRACE: out.meta.get(STACK_TRACE),
        VAL: out.meta.get(VAL),
    }
    out.replace_all_uses_with(call, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        graph.erase_node(node)
    return True


def _attr(root: Any, target: str, default: Any = AttributeError) -> Any:
    try:
        for part in target.split(".") if target else ():
            root = getattr(root, part)
        return root
    except AttributeError:
        if default is AttributeError:
            raise
        return default
