"""Rebuild a GraphModule from an untrusted ``sparsifx.save`` payload: validate everything, then build.

Order of work: the whole payload is checked (structure, counts, depth, every name that fx pastes into the
generated ``forward`` source, every function/class against the allow-lists) while the graph is assembled as
plain ``fx.Graph`` nodes; only then does ``fx.GraphModule`` generate and compile source. Any failure is a
``SerializationError`` naming the node, module or key.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import allow_list
from .errors import SerializationError, SparsifxError

_NODE_OPS = frozenset({"placeholder", "output", "call_module", "get_attr", "call_function", "call_method"})
_INIT_KEYS = frozenset(nn.Module().__dict__)
_DTYPES = {str(t).removeprefix("torch."): t for t in vars(torch).values() if isinstance(t, torch.dtype)}
_MEMORY_FORMATS = {
    n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
}
_LAYOUTS = {n: getattr(torch, n) for n in ("strided", "sparse_coo")}
_PAYLOAD_KEYS = {"graph": list, "modules": dict, "attrs": dict, "meta": dict, "tensors": dict}
_MODULE_KEYS = {"attrs": dict, "params": dict, "buffers": dict, "non_persistent": list, "children": dict}
# a submodule that is itself a GraphModule (``MicroBatched``'s body): its graph, modules and attrs as at the top level
GRAPH_CLASS = "$graph"
_GRAPH_KEYS = {"graph": list, "modules": dict, "attrs": dict, "class_name": str}


def expect(value: Any, kind: type | tuple, where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SerializationError(f"{where}expected {names}, found {type(value).__name__}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _name(value: Any, check: Callable[[Any], bool], what: str, where: str) -> str:
    if not check(value):
        raise SerializationError(f"{where}{what} {_short(value)} is not allowed")
    return value


def resolve_function(name: Any, where: str = "") -> Callable:
    """The function ``name`` denotes, if the allow-list names it (no import or lookup of the name itself)."""
    fn = allow_list.allowed_function(name)
    if fn is None:
        raise SerializationError(
            f"{where}function {_short(name)} is not in the allow-list of graph targets; "
            "register it with sparsifx.serialization.register_function"
        )
    return fn


def resolve_module_class(name: Any, where: str = "") -> type:
    cls = allow_list.allowed_module_class(name)
    if cls is None:
        raise SerializationError(
            f"{where}module class {_short(name)} is not in the allow-list; register it "
            "with sparsifx.serialization.register_module_class"
        )
    return cls


class _Decoder:
    """Tagged plain data -> Python values, with a depth cap and a budget on values visited."""

    def __init__(self, env: dict[str, fx.Node], budget: list[int], max_depth: int):
        self.env, self.budget, self.max_depth = env, budget, max_depth

    def __call__(self, value: Any, where: str, depth: int = 0) -> Any:
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise SerializationError(f"{where}file holds more values than the load limit")
        if depth > self.max_depth:
            raise SerializationError(f"{where}values nested deeper than {self.max_depth}")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self(v, where, depth + 1) for v in value]
        if isinstance(value, dict) and isinstance(value.get("$"), str) and value["$"] in _TAGS:
            return _TAGS[value["$"]](self, value.get("v"), where, depth + 1)
        raise SerializationError(f"{where}malformed value of type {type(value).__name__}")

    def items(self, v: Any, where: str, depth: int) -> list:
        return [self(x, where, depth) for x in expect(v, list, where)]

    def lookup(self, table: dict, key: Any, kind: str, where: str) -> Any:
        if not isinstance(key, str) or key not in table:
            raise SerializationError(f"{where}unknown {kind} {str(key)[:60]!r}")
        return table[key]


def _dict(d: _Decoder, v: Any, where: str, depth: int) -> dict:
    out = {}
    for pair in expect(v, list, where):
        if not isinstance(pair, list) or len(pair) != 2:
            raise SerializationError(f"{where}malformed dict entry")
        key = d(pair[0], where, depth)
        if not isinstance(key, (str, int, float, bool, type(None), torch.dtype)):
            raise SerializationError(f"{where}dict key of type {type(key).__name__} is not allowed")
        out[key] = d(pair[1], where, depth)
    return out


def _slice(d: _Decoder, v: Any, where: str, depth: int) -> slice:
    parts = d.items(v, where, depth)
    if len(parts) != 3:
        raise SerializationError(f"{where}a slice has 3 parts")
    return slice(*parts)


def _ints(d: _Decoder, v: Any, where: str, depth: int) -> torch.Size:
    items = d.items(v, where, depth)
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62 for x in items):
        raise SerializationError(f"{where}a size holds non-negative integers")
    return torch.Size(items)


def _device(d: _Decoder, v: Any, where: str, depth: int) -> torch.device:
    try:
        return torch.device(expect(v, str, where)[:32])
    except RuntimeError as exc:
        raise SerializationError(f"{where}bad device {v[:32]!r}") from exc


def _complex(d: _Decoder, v: Any, where: str, depth: int) -> complex:
    parts = expect(v, list, where)
    if len(parts) != 2 or not all(isinstance(p, float) for p in parts):
        raise SerializationError(f"{where}a complex number has 2 floats")
    return complex(*parts)


_TAGS: dict[str, Callable[[_Decoder, Any, str, int], Any]] = {
    "node": lambda d, v, w, depth: d.lookup(d.env, v, "node", w),
    "size": _ints,
    "tuple": lambda d, v, w, depth: tuple(d.items(v, w, depth)),
    "dict": _dict,
    "slice": _slice,
    "ellipsis": lambda d, v, w, depth: Ellipsis,
    "dtype": lambda d, v, w, depth: d.lookup(_DTYPES, v, "dtype", w),
    "device": _device,
    "memory_format": lambda d, v, w, depth: d.lookup(_MEMORY_FORMATS, v, "memory format", w),
    "layout": lambda d, v, w, depth: d.lookup(_LAYOUTS, v, "layout", w),
    "complex": _complex,
}


class PayloadReader:
    """Checks a payload against ``limits`` and builds the root modules and the graph."""

    def __init__(self, payload: Any, limits: Any):
        self.limits = limits
        self.budget = [limits.max_values]
        self.module_count = 0
        expect(payload, dict, "file: ")
        for key, kind in _PAYLOAD_KEYS.items():
            expect(payload.get(key), kind, f"file key '{key}': ")
        self.payload = payload
        self.tensors = payload["tensors"]
        if len(payload["graph"]) > limits.max_nodes:  # before anything is built; nested graphs count in graph()
            raise SerializationError(f"file has {len(payload['graph'])} nodes; the limit is {limits.max_nodes}")
        self.node_count = 0

    def decode(self, value: Any, where: str, env: dict | None = None) -> Any:
        return _Decoder(env or {}, self.budget, self.limits.max_depth)(value, where)

    def tensor(self, key: Any, where: str) -> torch.Tensor:
        t = self.tensors.get(key) if isinstance(key, str) else None
        if not isinstance(t, torch.Tensor):
            raise SerializationError(f"{where}missing tensor {str(key)[:60]!r}")
        return t

    # ------------------------------------------------------------ modules
    def module(self, record: Any, path: str, depth: int = 0) -> nn.Module:
        where = f"module '{path}': "
        self.module_count += 1
        if self.module_count > self.limits.max_modules or depth > self.limits.max_depth:
            raise SerializationError(f"{where}more or deeper submodules than the load limits allow")
        expect(record, dict, where)
        if record.get("class") == GRAPH_CLASS:
            return self.graph_module(record, path, depth)
        for key, kind in _MODULE_KEYS.items():
            expect(record.get(key), kind, f"{where}key '{key}': ")
        cls = resolve_module_class(record.get("class"), where)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for key, value in record["attrs"].items():
            _name(key, lambda k: _plain_attribute(cls, k), "attribute name", where)
            module.__dict__[key] = self.decode(value, f"{where}attribute '{key}': ")
        for key, entry in record["params"].items():
            _name(key, _free_child_name(cls), "parameter name", where)
            if entry is not None:
                expect(entry, dict, f"{where}parameter '{key}': ")
                entry = nn.Parameter(self.tensor(entry.get("key"), where), requires_grad=bool(entry.get("grad")))
            module._parameters[key] = entry
        for key, entry in record["buffers"].items():
            _name(key, _free_child_name(cls), "buffer name", where)
            module._buffers[key] = None if entry is None else self.tensor(entry, where)
        for key in record["non_persistent"]:
            _name(key, lambda k: k in module._buffers, "non-persistent buffer", where)
        module._non_persistent_buffers_set.update(record["non_persistent"])
        for key, child in record["children"].items():
            _name(key, _free_child_name(cls), "child name", where)
            module._modules[key] = self.module(child, f"{path}.{key}", depth + 1)
        module.training = bool(record.get("training"))
        after_load = getattr(cls, "_after_load", None)  # allow-listed classes validate what they were given
        if after_load is not None:
            try:
                after_load(module)
            except SparsifxError as exc:
                raise SerializationError(f"{where}{exc}") from exc
        return module

    def graph_module(self, record: dict, path: str = "", depth: int = 0) -> fx.GraphModule:
        """A GraphModule from ``record`` (the payload itself at the top level, or a nested ``GRAPH_CLASS``
        record); source is generated only after its graph and modules were checked."""
        where = f"module '{path}': " if path else "file: "
        for key, kind in _GRAPH_KEYS.items():
            expect(record.get(key), kind, f"{where}key '{key}': ")
        class_name = record["class_name"]
        if not allow_list.is_identifier(class_name):
            raise SerializationError(f"{where}class name {class_name[:60]!r} is not an identifier")
        root = self.root(record, path, depth)
        gm = fx.GraphModule(root, self.graph(record["graph"], root), class_name)  # all names checked above
        gm.training = bool(record.get("training"))
        return gm

    def root(self, record: dict, path: str = "", depth: int = 0) -> dict[str, Any]:
        root: dict[str, Any] = {}
        prefix = f"{path}." if path else ""
        for target, rec in record["modules"].items():
            _name(target, allow_list.is_module_path, "module path", "file key 'modules': ")
            root[target] = self.module(rec, prefix + target, depth + (1 if path else 0))
        for target, rec in record["attrs"].items():
            where = f"get_attr '{str(target)[:60]}': "
            _name(target, allow_list.is_module_path, "attribute path", where)
            expect(rec, dict, where)
            t = self.tensor(rec.get("key"), where)
            root[target] = nn.Parameter(t, requires_grad=bool(rec.get("grad"))) if rec.get("param") else t
        return root

    # ------------------------------------------------------------ graph
    def graph(self, records: list, root: dict[str, Any]) -> fx.Graph:
        self.node_count += len(records)
        if self.node_count > self.limits.max_nodes:
            raise SerializationError(f"file has more than {self.limits.max_nodes} nodes, the load limit")
        graph, env = fx.Graph(), {}
        for i, rec in enumerate(records):
            where = f"node #{i}: "
            expect(rec, dict, where)
            op, name = rec.get("op"), rec.get("name")
            _name(name, allow_list.is_identifier, "node name", where)
            where = f"node '{name}' ({str(op)[:20]}): "
            if op not in _NODE_OPS:
                raise SerializationError(f"{where}unknown node op")
            target = _TARGET_CHECKS[op](rec.get("target"), root, where)
            args = self.decode(rec.get("args"), where, env)
            kwargs = self.decode(rec.get("kwargs"), where, env)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise SerializationError(f"{where}malformed args/kwargs")
            for key in kwargs:
                _name(key, allow_list.is_identifier, "keyword argument", where)
            _check_call(name, op, target, args, kwargs)
            node = graph.create_node(op, target, args, kwargs, name=name)
            if node.name != name:
                raise SerializationError(f"{where}node name is reserved or repeated")
            env[name] = node
        outputs = [n for n in graph.nodes if n.op == "output"]
        if len(outputs) != 1 or outputs[0] is not graph._root.prev:
            raise SerializationError("file: a graph has exactly one output node, at the end")
        graph.lint()
        return graph


def _plain_attribute(cls: type, key: Any) -> bool:
    """An instance attribute a file may set: an identifier that shadows no method or property of ``cls``."""
    if not allow_list.is_identifier(key) or key.startswith("__") or key in _INIT_KEYS:
        return False
    on_class = getattr(cls, key, None)
    return not (callable(on_class) or isinstance(on_class, property))


def _free_child_name(cls: type) -> Callable[[Any], bool]:
    return lambda key: allow_list.is_child_name(key) and not hasattr(cls, key)


def _target_function(target: Any, root: dict, where: str) -> Callable:
    return resolve_function(target, where)


def _target_method(target: Any, root: dict, where: str) -> str:
    if not allow_list.allowed_method(target):
        raise SerializationError(f"{where}method {str(target)[:80]!r} is not a torch.Tensor method")
    return target


def _target_owned(target: Any, root: dict, where: str) -> str:
    if not allow_list.is_module_path(target) or target not in root:
        raise SerializationError(f"{where}target {str(target)[:80]!r} has no saved module or tensor")
    return target


def _target_placeholder(target: Any, root: dict, where: str) -> str:
    return _name(target, allow_list.is_placeholder_target, "placeholder", where)


def _target_output(target: Any, root: dict, where: str) -> str:
    return _name(target, lambda t: t == "output", "output target", where)


_TARGET_CHECKS = {
    "call_function": _target_function,
    "call_method": _target_method,
    "call_module": _target_owned,
    "get_attr": _target_owned,
    "placeholder": _target_placeholder,
    "output": _target_output,
}


def _check_call(name: str, op: str, target: Any, args: tuple, kwargs: dict) -> None:
    """Per-call rules the allow-list alone cannot express (``getattr`` attributes, ``min``/``max`` keys)."""
    if op != "call_function":
        return
    if target is getattr:
        if len(args) not in (2, 3) or not allow_list.allowed_attribute(args[1]) or kwargs:
            raise SerializationError(
                f"node '{name}': getattr of a private, callable or computed attribute is not allowed"
            )
    elif allow_list.function_name(target) in allow_list.NO_KWARGS_FUNCTIONS and kwargs:
        raise SerializationError(f"node '{name}': {target.__name__} with keyword arguments is not allowed")
