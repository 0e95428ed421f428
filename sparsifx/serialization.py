"""``save`` / ``load``: a GraphModule as plain data + tensors, loadable with ``torch.load(weights_only=True)``.

The file holds no pickled code. It is a dict of strings, numbers, lists, dicts and tensors:

- ``graph``: one record per node (op, name, target, args, kwargs). Function targets are stored as
  qualified names (``torch.flatten``, ``operator.add``) and resolved on load from an allow-list
  (``torch``, ``torch.nn.functional``, ``operator``, ``math``, a few builtins, ``torchvision.ops`` and the
  functions torchvision wraps with ``torch.fx.wrap``); ``call_method`` targets must be ``torch.Tensor``
  methods. Node references, tuples, slices, dtypes and devices are tagged dicts (``{"$": "node", ...}``).
- ``modules``: for every ``call_module`` target, its class (from the allow-list of module classes: every
  ``torch.nn`` layer, sparsifx's masked layers, torchvision leaves such as ``StochasticDepth``/``Permute``/
  ``LayerNorm2d``; extend with :func:`register_module_class`), its plain attributes (``in_channels``,
  ``groups``, ``eps``, ...), its parameters/buffers by key into ``tensors``, and its children.
- ``attrs``: ``get_attr`` targets (tensors).

Anything that cannot be written this way (an unknown function, a module class outside the allow-list, an
attribute holding an object, a hook) raises :class:`SerializationError` naming the node or module; a file
naming something outside the allow-lists is refused on load the same way.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import _get_qualified_name

from .errors import SparsifxError

log = logging.getLogger(__name__)

FORMAT = "sparsifx.graphmodule"
VERSION = 1


class SerializationError(SparsifxError):
    """A module cannot be saved as plain data, or a file names something outside the allow-lists."""


# ---------------------------------------------------------------- allow-lists
# Modules whose functions may be graph targets (module name -> names allowed there; None = any public op).
_FUNCTION_MODULES: dict[str, frozenset[str] | None] = {
    "torch": None, "torch.functional": None, "torch.nn.functional": None, "torch._C._nn": None,
    "torch.Tensor": None, "torch._C._linalg": None, "torch._C._special": None, "torch._C._fft": None,
    "operator": None, "math": None,
    "builtins": frozenset({"getattr", "len", "int", "float", "bool", "min", "max", "abs", "round", "sum",
                           "tuple", "list", "range", "slice"}),
    "torchvision.models.swin_transformer": frozenset({"_patch_merging_pad", "_get_relative_position_bias",
                                                      "shifted_window_attention"}),
    "torchvision.models.video.swin_transformer": frozenset({
        "_get_window_and_shift_size", "_get_relative_position_bias", "_compute_pad_size_3d",
        "_compute_attention_mask_3d", "shifted_window_attention_3d"}),
    "torchvision.models.googlenet": frozenset({"GoogLeNetOutputs"}),  # namedtuple outputs (training graphs)
    "torchvision.models.inception": frozenset({"InceptionOutputs"}),
    "torchvision.models.video.mvit": frozenset({"_unsqueeze", "_squeeze", "_add_rel_pos", "_add_shortcut"}),
}
_FUNCTION_MODULE_PREFIXES = ("torchvision.ops.",)
# Top-level torch functions with effects outside the graph: never graph targets here.
_DENIED_TORCH = ("set_", "use_", "manual_seed", "seed", "compile", "load", "save", "from_file", "_dynamo")
_EXTRA_FUNCTIONS: dict[str, Callable] = {}

# Module classes: qualified class name -> "module:attr" to import lazily, or the class itself.
_MODULE_CLASSES: dict[str, Any] = {
    "torchvision.ops.stochastic_depth.StochasticDepth": "torchvision.ops.stochastic_depth:StochasticDepth",
    "torchvision.ops.misc.Permute": "torchvision.ops.misc:Permute",
    "torchvision.models.convnext.LayerNorm2d": "torchvision.models.convnext:LayerNorm2d",
    "torchvision.ops.misc.FrozenBatchNorm2d": "torchvision.ops.misc:FrozenBatchNorm2d",
}
for _name in ("MaskedLinear", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d"):
    _MODULE_CLASSES[f"sparsifx.masking.{_name}"] = f"sparsifx.masking:{_name}"
_TORCH_NN_PREFIX = "torch.nn.modules."
_INIT_KEYS = frozenset(nn.Module().__dict__)  # bookkeeping nn.Module.__init__ creates; not saved


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_module_class(cls: type) -> type:
    """Allow ``cls`` (an ``nn.Module`` whose state is plain attributes + tensors) in saved files."""
    _MODULE_CLASSES[_class_name(cls)] = cls
    return cls


def register_function(fn: Callable) -> Callable:
    """Allow ``fn`` as a ``call_function`` target in saved files (keyed by its qualified name)."""
    _EXTRA_FUNCTIONS[function_name(fn)] = fn
    return fn


def function_name(fn: Callable) -> str:
    name = _get_qualified_name(fn)
    if name.startswith("_operator."):
        name = name[1:]
    return "builtins." + name if "." not in name else name


def _function_allowed(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if not attr or any(part.startswith("__") for part in name.split(".")):
        return False
    if name in _EXTRA_FUNCTIONS:
        return True
    if module == "torch" and attr.startswith(_DENIED_TORCH):
        return False
    if module in _FUNCTION_MODULES:
        allowed = _FUNCTION_MODULES[module]
        return allowed is None or attr in allowed
    return module.startswith(_FUNCTION_MODULE_PREFIXES)


def resolve_function(name: str, where: str = "") -> Callable:
    """The function ``name`` denotes, if the allow-list admits it and the name is canonical."""
    if name in _EXTRA_FUNCTIONS:
        return _EXTRA_FUNCTIONS[name]
    if not _function_allowed(name):
        raise SerializationError(f"{where}function '{name}' is not in the allow-list of graph targets; "
                                 "register it with sparsifx.serialization.register_function")
    module, _, attr = name.rpartition(".")
    try:
        owner = torch.Tensor if module == "torch.Tensor" else importlib.import_module(module)
        fn = getattr(owner, attr)
    except (ImportError, AttributeError) as exc:
        raise SerializationError(f"{where}cannot resolve function '{name}': {exc}") from exc
    if not callable(fn) or function_name(fn) != name:
        raise SerializationError(f"{where}'{name}' does not name a function under that qualified name")
    return fn


def resolve_module_class(name: str, where: str = "") -> type:
    entry = _MODULE_CLASSES.get(name)
    if entry is None and name.startswith(_TORCH_NN_PREFIX) and not any(p.startswith("_") for p in
                                                                       name.split(".")[3:]):
        entry = name.rpartition(".")[0] + ":" + name.rpartition(".")[2]
    if entry is None:
        raise SerializationError(f"{where}module class '{name}' is not in the allow-list; register it with "
                                 "sparsifx.serialization.register_module_class")
    if isinstance(entry, str):
        mod, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise SerializationError(f"{where}cannot import module class '{name}': {exc}") from exc
    if not (isinstance(entry, type) and issubclass(entry, nn.Module)) or _class_name(entry) != name:
        raise SerializationError(f"{where}'{name}' does not name an nn.Module class")
    return entry


_DUNDER_METHODS = frozenset(f"__{n}__" for n in (
    "getitem", "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "truediv", "rtruediv",
    "floordiv", "rfloordiv", "matmul", "rmatmul", "pow", "rpow", "neg", "pos", "abs", "invert", "and", "or",
    "xor", "mod", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "len", "bool", "float", "int"))
_DENIED_METHODS = frozenset({"register_hook", "register_post_accumulate_grad_hook", "backward", "apply_",
                             "map_", "map2_", "share_memory_", "pin_memory"})


def _method_allowed(name: Any) -> bool:
    return (isinstance(name, str) and hasattr(torch.Tensor, name) and name not in _DENIED_METHODS
            and (not name.startswith("_") or name in _DUNDER_METHODS))


# ---------------------------------------------------------------- plain-data encoding
_DTYPES = {str(t).removeprefix("torch."): t for t in vars(torch).values() if isinstance(t, torch.dtype)}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "channels_last_3d",
                                                  "preserve_format")}
_LAYOUTS = {n: getattr(torch, n) for n in ("strided", "sparse_coo")}


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, fx.Node):
        return {"$": "node", "v": value.name}
    if isinstance(value, torch.Size):
        return {"$": "size", "v": [int(v) for v in value]}
    if isinstance(value, tuple):
        return {"$": "tuple", "v": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        return {"$": "dict", "v": [[_encode(k, where), _encode(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$": "slice", "v": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"$": "ellipsis"}
    if isinstance(value, torch.dtype):
        return {"$": "dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$": "device", "v": str(value)}
    if isinstance(value, torch.memory_format):
        return {"$": "memory_format", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"$": "layout", "v": str(value).removeprefix("torch.")}
    if isinstance(value, complex):
        return {"$": "complex", "v": [value.real, value.imag]}
    raise SerializationError(f"{where}value of type {type(value).__name__} cannot be stored as plain data")


def _lookup(table: dict, key: Any, kind: str, where: str) -> Any:
    if key not in table:
        raise SerializationError(f"{where}unknown {kind} {key!r}")
    return table[key]


_DECODERS: dict[str, Callable[[Any, dict, str], Any]] = {
    "node": lambda v, env, w: _lookup(env, v, "node", w),
    "size": lambda v, env, w: torch.Size([int(x) for x in v]),
    "tuple": lambda v, env, w: tuple(_decode(x, env, w) for x in v),
    "dict": lambda v, env, w: {_decode(k, env, w): _decode(x, env, w) for k, x in v},
    "slice": lambda v, env, w: slice(*(_decode(x, env, w) for x in v)),
    "ellipsis": lambda v, env, w: Ellipsis,
    "dtype": lambda v, env, w: _lookup(_DTYPES, v, "dtype", w),
    "device": lambda v, env, w: torch.device(str(v)),
    "memory_format": lambda v, env, w: _lookup(_MEMORY_FORMATS, v, "memory format", w),
    "layout": lambda v, env, w: _lookup(_LAYOUTS, v, "layout", w),
    "complex": lambda v, env, w: complex(float(v[0]), float(v[1])),
}


def _decode(value: Any, env: dict, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, env, where) for v in value]
    if isinstance(value, dict) and value.get("$") in _DECODERS:
        return _DECODERS[value["$"]](value.get("v"), env, where)
    raise SerializationError(f"{where}malformed value {value!r:.80}")


# ---------------------------------------------------------------- modules
def _module_record(module: nn.Module, path: str, tensors: dict[str, torch.Tensor]) -> dict:
    where = f"module '{path}': "
    cls_name = _class_name(type(module))
    resolve_module_class(cls_name, where)
    hooks = [k for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")
             if getattr(module, k, None)]
    if hooks:
        raise SerializationError(f"{where}has hooks ({', '.join(hooks)}); hooks cannot be saved as data")
    attrs = {}
    for key, value in module.__dict__.items():
        if key in _INIT_KEYS or key.startswith("__"):
            continue
        attrs[key] = _encode(value, f"{where}attribute '{key}': ")
    params, buffers = {}, {}
    for kind, table, source in (("p", params, module._parameters), ("b", buffers, module._buffers)):
        for key, tensor in source.items():
            if tensor is None:
                table[key] = None
                continue
            tkey = f"{path}.{key}" if path else key
            tensors[tkey] = tensor.detach()
            table[key] = {"key": tkey, "grad": bool(tensor.requires_grad)} if kind == "p" else tkey
    return {"class": cls_name, "training": module.training, "attrs": attrs, "params": params,
            "buffers": buffers, "non_persistent": sorted(module._non_persistent_buffers_set),
            "children": {k: _module_record(c, f"{path}.{k}", tensors) for k, c in module._modules.items()
                         if c is not None}}


def _tensor(tensors: dict, key: Any, where: str) -> torch.Tensor:
    t = tensors.get(key) if isinstance(key, str) else None
    if not isinstance(t, torch.Tensor):
        raise SerializationError(f"{where}missing tensor {key!r}")
    return t


def _build_module(record: dict, path: str, tensors: dict) -> nn.Module:
    where = f"module '{path}': "
    cls = resolve_module_class(record.get("class", "?"), where)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in record["attrs"].items():
        if not isinstance(key, str) or key.startswith("__") or key in _INIT_KEYS:
            raise SerializationError(f"{where}attribute name {key!r} is not allowed")
        module.__dict__[key] = _decode(value, {}, f"{where}attribute '{key}': ")
    for key, entry in record["params"].items():
        module._parameters[key] = None if entry is None else nn.Parameter(
            _tensor(tensors, entry["key"], where), requires_grad=bool(entry["grad"]))
    for key, entry in record["buffers"].items():
        module._buffers[key] = None if entry is None else _tensor(tensors, entry, where)
    module._non_persistent_buffers_set.update(record["non_persistent"])
    for key, child in record["children"].items():
        module._modules[key] = _build_module(child, f"{path}.{key}", tensors)
    module.training = bool(record["training"])
    return module


# ---------------------------------------------------------------- graph
def _target_record(node: fx.Node) -> Any:
    where = f"node '{node.name}' ({node.op}): "
    if node.op == "call_function":
        name = function_name(node.target)
        resolve_function(name, where)
        return name
    if node.op == "call_method" and not _method_allowed(node.target):
        raise SerializationError(f"{where}method '{node.target}' is not a torch.Tensor method")
    return node.target


def _encode_graph(gm: fx.GraphModule, tensors: dict) -> tuple[list, dict, dict]:
    nodes, modules, attrs = [], {}, {}
    for node in gm.graph.nodes:
        where = f"node '{node.name}' ({node.op}): "
        target = _target_record(node)
        if node.op == "call_function":
            _check_getattr(node.name, node.target, node.args)
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = _module_record(gm.get_submodule(node.target), node.target, tensors)
        if node.op == "get_attr" and node.target not in attrs:
            value = _fetch_attr(gm, node.target, where)
            key = f"attr:{node.target}"
            tensors[key] = value.detach()
            attrs[node.target] = {"key": key, "param": isinstance(value, nn.Parameter),
                                  "grad": bool(value.requires_grad)}
        nodes.append({"op": node.op, "name": node.name, "target": target,
                      "args": _encode(node.args, where), "kwargs": _encode(node.kwargs, where)})
    return nodes, modules, attrs


def _fetch_attr(gm: fx.GraphModule, target: str, where: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise SerializationError(f"{where}get_attr '{target}' is a {type(obj).__name__}, not a tensor")
    return obj


_NODE_OPS = frozenset({"placeholder", "output", "call_module", "get_attr", "call_function", "call_method"})


def _decode_graph(payload: dict, tensors: dict) -> tuple[fx.Graph, dict]:
    graph, env, root = fx.Graph(), {}, {}
    for target, rec in payload["modules"].items():
        root[target] = _build_module(rec, target, tensors)
    for target, rec in payload["attrs"].items():
        t = _tensor(tensors, rec["key"], f"get_attr '{target}': ")
        root[target] = nn.Parameter(t, requires_grad=bool(rec["grad"])) if rec["param"] else t
    for rec in payload["graph"]:
        op, name, where = rec["op"], rec["name"], f"node '{rec.get('name')}' ({rec.get('op')}): "
        target = rec["target"]
        if op not in _NODE_OPS:
            raise SerializationError(f"{where}unknown node op {op!r}")
        if op == "call_function":
            target = resolve_function(target, where)
        elif op == "call_method" and not _method_allowed(target):
            raise SerializationError(f"{where}method {target!r} is not a torch.Tensor method")
        elif op in ("call_module", "get_attr") and target not in root:
            raise SerializationError(f"{where}target {target!r} has no saved module or tensor")
        args, kwargs = _decode(rec["args"], env, where), _decode(rec["kwargs"], env, where)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise SerializationError(f"{where}malformed args/kwargs")
        if op == "call_function":
            _check_getattr(name, target, args)
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
    return graph, root


def _check_getattr(name: str, fn: Callable, args: tuple) -> None:
    if fn is getattr and (len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("_")):
        raise SerializationError(f"node '{name}': getattr of a private or computed attribute is not allowed")


# ---------------------------------------------------------------- public API
def to_payload(gm: fx.GraphModule) -> dict:
    """The plain-data form of ``gm`` (what :func:`save` writes)."""
    if not isinstance(gm, fx.GraphModule):
        raise SerializationError(f"save needs a torch.fx.GraphModule (trace the model first), got "
                                 f"{type(gm).__name__}")
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise SerializationError(f"graph uses {type(gm.graph._codegen).__name__}; only the default codegen "
                                 "(no pytree inputs/outputs) can be saved")
    tensors: dict[str, torch.Tensor] = {}
    nodes, modules, attrs = _encode_graph(gm, tensors)
    meta = {}
    for key, value in gm.meta.items():
        try:
            meta[key] = _encode(value, "")
        except SerializationError:
            log.info("gm.meta[%r] (%s) is not plain data; not saved", key, type(value).__name__)
    return {"format": FORMAT, "version": VERSION, "class_name": type(gm).__name__, "training": gm.training,
            "graph": nodes, "modules": modules, "attrs": attrs, "meta": meta, "tensors": tensors}


def from_payload(payload: Any) -> fx.GraphModule:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SerializationError("not a sparsifx GraphModule file")
    if payload.get("version") != VERSION:
        raise SerializationError(f"unsupported file version {payload.get('version')!r}; this sparsifx reads "
                                 f"version {VERSION}")
    try:
        graph, root = _decode_graph(payload, payload["tensors"])
        gm = fx.GraphModule(root, graph, str(payload["class_name"]))
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise SerializationError(f"malformed sparsifx file: {type(exc).__name__}: {exc}") from exc
    gm.training = bool(payload["training"])
    for target, rec in payload["modules"].items():
        gm.get_submodule(target).train(bool(rec["training"]))
    gm.meta.update({k: _decode(v, {}, f"meta '{k}': ") for k, v in payload["meta"].items()})
    return gm


def save(module: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``module`` (a GraphModule, e.g. a shrunk model) to ``path`` as data + tensors.

    The file loads with ``torch.load(path, weights_only=True)``; :func:`load` rebuilds the module
    without the model's Python class. Raises :class:`SerializationError` naming the node or module that
    cannot be stored (unknown function or module class, non-plain attribute, hooks).
    """
    torch.save(to_payload(module), path)


def load(path: str | os.PathLike, map_location: Any = None) -> fx.GraphModule:
    """Read a file written by :func:`save` (never unpickles code; allow-listed targets only)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SerializationError(f"cannot read '{path}' as a weights-only file (no code is unpickled): "
                                 f"{type(exc).__name__}: {first}") from exc
    return from_payload(payload)


__all__ = ["save", "load", "register_module_class", "register_function", "SerializationError"]
