"""``trace_hf``: a Hugging Face ``transformers`` model as an ``fx.GraphModule`` with its layers visible.

Plain symbolic tracing stops at the first shape, ``ndim`` or dtype test in transformers' code (embeddings,
mask creation, padding checks), and transformers 5 no longer ships ``transformers.utils.fx``. ``trace_hf``
traces with a ``SparsifxTracer`` whose proxies also carry the value the example inputs give them: tests on
shapes, dtypes and other metadata resolve to the example's (transformers sees an fx ``Proxy`` and takes its
tracing-safe paths), while every op on tensors is recorded as in ``sparsifx.trace``: torch-level
functions and methods, ``nn.*`` layers, transformers' ``Conv1D`` and sparsifx's masked layers as
``call_module`` leaves. A Python branch on a tensor's *values* is never baked in silently: it raises, and the
submodule it is in is retried as an opaque leaf (named in ``gm.meta["opaque_leaves"]``).

``method="export"`` captures with ``torch.export`` instead (``sparsifx.hf_export``): an ATen-level graph with
the same layers folded back into ``call_module`` nodes, for models the value tracer cannot follow.

The graph takes the tensors of ``example_inputs`` as inputs, in the dict's order (``gm(**inputs)`` works), and
returns ``model(**inputs, return_dict=False, use_cache=False)``: a tuple, logits first. It is specialised to
the example inputs' shapes and traced in eval mode (attention dropout is recorded off; ``nn.Dropout``
modules stay modules and follow ``train()``).
"""

from __future__ import annotations

import inspect
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate

from .errors import TraceError
from .masking import register_hf_types
from .meta_keys import NN_MODULE_STACK
from .module_classes import record_module_classes
from .module_utils import clone_module, eval_mode
from .tracing import MAX_OPAQUE_RETRIES, SparsifxTracer, record_shapes

log = logging.getLogger(__name__)

DEFAULT_CONSTANTS = {"return_dict": False, "use_cache": False}  # passed where the forward accepts them
METHODS = ("fx", "export")
PREFIX = "model."  # the model's path inside the wrapper that is traced


@dataclass
class Captured:
    """What a capture method hands back: the graph over the model's paths, the submodules kept opaque, tensors
    the graph reads that the model does not hold (lifted constants), and leaf calls left inlined."""

    graph: fx.Graph
    opaque: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    inlined: list[str] = field(default_factory=list)


class HFCall(nn.Module):
    """``model(**dict(zip(names, tensors)), **constants)`` as a tuple: the module that is traced."""

    def __init__(self, model: nn.Module, names: list[str], constants: dict[str, Any]):
        super().__init__()
        self.model, self.names, self.constants = model, names, constants

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)), **self.constants)
        return out.to_tuple() if hasattr(out, "to_tuple") else out


def trace_hf(
    model: nn.Module,
    example_inputs: Mapping[str, Any],
    *,
    leaf_modules: Iterable[str | type] = (),
    method: str = "fx",
    verify: bool = True,
    copy_model: bool = True,
) -> fx.GraphModule:
    """Trace a transformers model (module doc).

    ``example_inputs`` maps forward argument names to tensors (the graph's inputs) or plain values (fixed,
    e.g. ``output_attentions=False``). ``leaf_modules``: module classes or paths kept as ``call_module``.
    ``method``: ``"fx"`` (torch-level graph) or ``"export"`` (ATen graph via ``torch.export``). With
    ``verify`` the graph is run on the inputs and compared with the model. Raises ``TraceError``."""
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace_hf needs a torch.nn.Module, got {name}")
    if method not in METHODS:
        raise TraceError(f"trace_hf({name}): method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise TraceError(
            f"trace_hf({name}): example_inputs must be a non-empty dict of forward arguments "
            f"(e.g. {{'input_ids': ids, 'attention_mask': mask}}), got {type(example_inputs).__name__}"
        )
    names = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
    if not names or not all(k.isidentifier() for k in names):
        raise TraceError(
            f"trace_hf({name}): example_inputs needs tensors keyed by forward argument names, "
            f"got keys {list(example_inputs)}"
        )
    hf_types = register_hf_types()
    leaf_types = tuple(hf_types) + tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
    if copy_model:
        model = clone_module(model)
    tensors = tuple(example_inputs[k] for k in names)
    call = HFCall(model, names, _constants(model, {k: v for k, v in example_inputs.items() if k not in names}))
    with eval_mode(model):
        if method == "fx":
            cap = _trace_fx(call, tensors, leaf_paths, leaf_types)
        else:
            from .hf_export import export_graph

            cap = export_graph(call, tensors, leaf_paths, leaf_types)
    gm = fx.GraphModule(_targets(cap.graph, model, cap.constants), cap.graph, name)
    gm.meta.update(
        opaque_leaves=cap.opaque,
        inlined_leaves=cap.inlined,
        leaf_types=leaf_types,
        hf_input_names=names,
        hf_trace_method=method,
    )
    record_module_classes(model, gm)
    if cap.opaque or cap.inlined:
        log.warning(
            "trace_hf(%s): layers not visible as call_module: opaque %s, inlined %s",
            name,
            cap.opaque[:8],
            cap.inlined[:8],
        )
    if verify:
        _verify(gm, call, tensors)
    record_shapes(gm, tensors)
    return gm


def _constants(model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # return_dict is taken by transformers' @can_return_tuple wrapper: accepted wherever **kwargs are
    defaults = {k: v for k, v in DEFAULT_CONSTANTS.items() if k in params or (k == "return_dict" and var_kw)}
    return {**defaults, **given}


# ------------------------------------------------------------------------------------------ value tracer
class ValueProxy(fx.Proxy):
    """A proxy with the example's value in ``value``: metadata reads and Python control flow on shapes see it;
    control flow on a tensor's values raises (the branch would be baked into the graph)."""

    value: Any = None

    def _concrete(self, what: str) -> Any:
        if isinstance(self.value, torch.Tensor):
            raise fx.proxy.TraceError(
                f"{what} of tensor '{self.node.name}' depends on its values: the branch it decides cannot be recorded"
            )
        return self.value

    def __bool__(self) -> bool:
        return bool(self._concrete("bool()"))

    def __index__(self) -> int:
        return operator.index(self._concrete("int index"))

    def __int__(self) -> int:
        return int(self._concrete("int()"))

    def __float__(self) -> float:
        return float(self._concrete("float()"))

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self):
        return iter([self[i] for i in range(len(self.value))])

    def size(self, *dim):
        return self.value.size(*dim)

    def dim(self) -> int:
        return self.value.dim()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.value, name, None)
        if attr is not None and not callable(attr) and not isinstance(attr, torch.Tensor):
            return attr  # shape, dtype, device, ndim, is_cuda, requires_grad...
        return super().__getattr__(name)


def _value(a: Any) -> Any:
    return map_aggregate(a, lambda x: x.value if isinstance(x, ValueProxy) else x)


class ValueTracer(SparsifxTracer):
    """``SparsifxTracer`` that runs each recorded op on the example values (fx's patches off meanwhile)."""

    def __init__(self, inputs: tuple, leaf_paths: Iterable[str] = (), leaf_types: Iterable[type] = ()):
        super().__init__(leaf_paths, leaf_types)
        self.inputs, self._running = inputs, False

    def proxy(self, node: fx.Node) -> ValueProxy:
        return ValueProxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._running else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._running:
            return forward(*args, **kwargs)
        try:
            self.path_of_module(m)
        except NameError:  # a module used as a function (kernels-hub wrappers): not in the tree, inline it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, ValueProxy):
            self._running = True
            try:
                proxy.value = self._run(kind, target, _value(args), _value(kwargs))
            finally:
                self._running = False
        return proxy

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.inputs
        if kind == "get_attr":
            return _attr(self.root, target)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return _attr(self.root, target)(*args, **kwargs)  # call_module: fx's wrapper runs it directly


def _trace_fx(call: HFCall, tensors: tuple, leaf_paths: set[str], leaf_types: tuple) -> Captured:
    """Trace ``call`` with the value tracer, retrying a failing submodule as an opaque leaf (as ``trace``)."""
    opaque: list[str] = []
    for _ in range(MAX_OPAQUE_RETRIES):
        values = tuple(t.clone() for t in tensors)  # the example values the ops run on (in-place ops stay here)
        tracer = ValueTracer(values, {PREFIX + p for p in leaf_paths} | set(opaque), leaf_types)
        try:
            with torch.no_grad():
                graph = tracer.trace(call)
            break
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... depending on the construct
            culprit = (tracer.failed_in or [""])[-1]
            if culprit in ("", "model") or culprit in opaque:
                raise TraceError(
                    f"cannot trace {type(call.model).__name__} with trace_hf: {type(exc).__name__}: {exc}. Try: "
                    "pass every input the forward needs as a tensor in example_inputs (input_ids, attention_mask, "
                    "decoder_input_ids, pixel_values...) and options as plain values, list the module that fails "
                    "in leaf_modules, or method='export'."
                ) from exc
            log.info("trace_hf: submodule %s is not traceable (%s); keeping it as an opaque leaf", culprit, exc)
            opaque.append(culprit)
    else:
        raise TraceError(f"trace_hf: gave up after {MAX_OPAQUE_RETRIES} opaque-leaf retries: {opaque[-5:]}")
    _name_inputs(graph, call.names)
    constants = {n: _attr(call, n) for n in _lifted(graph)}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = strip(node.target)
        strip_stack(node)
    return Captured(graph, [strip(p) for p in opaque], constants)


def _lifted(graph: fx.Graph) -> list[str]:
    """get_attr targets outside the model: tensors the tracer made constants (``_tensor_constant0``)."""
    return [n.target for n in graph.nodes if n.op == "get_attr" and not n.target.startswith(PREFIX)]


def _name_inputs(graph: fx.Graph, names: list[str]) -> None:
    """The ``*tensors`` placeholder and its ``getitem`` nodes become one placeholder per input name."""
    star = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_before(star):
        inputs = [graph.placeholder(n) for n in names]
    for user in list(star.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise TraceError(f"trace_hf: the inputs tuple is used as a whole by node '{user.name}'")
        user.replace_all_uses_with(inputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(star)


# ------------------------------------------------------------------------------------------ shared helpers
def strip(path: str) -> str:
    """A path inside the traced wrapper as a path of the model (``model.bert.pooler`` -> ``bert.pooler``)."""
    return path[len(PREFIX) :] if path.startswith(PREFIX) else path


def strip_stack(node: fx.Node) -> None:
    """``nn_module_stack`` with the wrapper's entries dropped and paths relative to the model."""
    stack = node.meta.get(NN_MODULE_STACK)
    if stack:
        node.meta[NN_MODULE_STACK] = {strip(k): (strip(p), t) for k, (p, t) in stack.items() if p not in ("", "model")}


def _attr(root: Any, target: str) -> Any:
    """``root.a.b.c`` read from the modules' own dicts (no ``__getattr__``: fx patches it while tracing)."""
    for part in target.split("."):
        d = root.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if part in d.get(table, {}):
                root = d[table][part]
                break
        else:
            root = getattr(root, part)
    return root


def _targets(graph: fx.Graph, model: nn.Module, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``call_module`` / ``get_attr`` target resolved on the model (tied tensors stay tied), or in
    ``extra`` (constants the tracer lifted out of the code)."""
    out: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in out:
            try:
                out[node.target] = _attr(model, node.target)
            except AttributeError:
                out[node.target] = extra[node.target]
    return out


def _verify(gm: fx.GraphModule, call: HFCall, tensors: tuple) -> None:
    name = type(call.model).__name__
    with eval_mode(call, gm), torch.no_grad():
        expected, got = call(*tensors), gm(*tensors)
    try:
        torch.testing.assert_close(got, expected)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TraceError(
            f"trace_hf({name}): the traced graph does not reproduce the model's outputs on the "
            f"example inputs ({type(exc).__name__}: {first}). Try verify=False to inspect it, the "
            "other method, or list the module that differs in leaf_modules."
        ) from exc
