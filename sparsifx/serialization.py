"""``save`` / ``load``: a GraphModule as plain data + tensors, loadable with ``torch.load(weights_only=True)``.

The file holds no pickled code. It is a dict of strings, numbers, lists, dicts and tensors:

- ``graph``: one record per node (op, name, target, args, kwargs). Function targets are stored as
  qualified names (``torch.flatten``, ``operator.add``) and looked up on load in a table of individually
  allowed functions (see :mod:`sparsifx.allow_list`); ``call_method`` targets must be public
  ``torch.Tensor`` methods. Node references, tuples, slices, dtypes and devices are tagged dicts
  (``{"$": "node", ...}``).
- ``modules``: for every ``call_module`` target, its class (from the allow-list of module classes: every
  public ``torch.nn`` layer, sparsifx's masked layers, torchvision leaves such as ``StochasticDepth``/
  ``Permute``/``LayerNorm2d``; extend with :func:`register_module_class`), its plain attributes
  (``in_channels``, ``groups``, ``eps``, ...), its parameters/buffers by key into ``tensors``, and its children.
- ``attrs``: ``get_attr`` targets (tensors).

Anything that cannot be written this way (an unknown function, a module class outside the allow-list, an
attribute holding an object, a hook) raises :class:`SerializationError` naming the node or module. Loading
is the untrusted side (:mod:`sparsifx.file_reader`, threat model in ``docs/security.md``): size limits are
checked before the archive is read, every name that becomes source is validated, and any malformed file
raises :class:`SerializationError`.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import allow_list
from .atomic_io import atomic_write
from .errors import SerializationError
from .file_reader import _INIT_KEYS, GRAPH_CLASS, PayloadReader, _check_call, resolve_function, resolve_module_class

log = logging.getLogger(__name__)

FORMAT = "sparsifx.graphmodule"
VERSION = 1


# ---------------------------------------------------------------- allow-lists (see allow_list.py)
_EXTRA_FUNCTIONS = allow_list.EXTRA_FUNCTIONS
function_name = allow_list.function_name
_class_name = allow_list.class_name


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on what :func:`load` accepts before it builds anything (a file is untrusted input)."""

    max_file_bytes: int = 16 << 30
    max_entries: int = 200_000  # archive members (one per tensor storage)
    max_nodes: int = 1_000_000
    max_modules: int = 200_000
    max_depth: int = 64  # nesting of values and of submodules
    max_values: int = 20_000_000  # decoded values in all, shared references counted each time


def register_module_class(cls: type) -> type:
    """Allow ``cls`` (an ``nn.Module`` whose state is plain attributes + tensors) in saved files."""
    allow_list.MODULE_CLASSES[_class_name(cls)] = cls
    return cls


def register_function(fn: Callable) -> Callable:
    """Allow ``fn`` as a ``call_function`` target in saved files (keyed by its qualified name)."""
    _EXTRA_FUNCTIONS[function_name(fn)] = fn
    return fn


# ---------------------------------------------------------------- plain-data encoding


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


# ---------------------------------------------------------------- modules
def _module_record(module: nn.Module, path: str, tensors: dict[str, torch.Tensor]) -> dict:
    where = f"module '{path}': "
    if isinstance(module, fx.GraphModule):  # a nested graph (MicroBatched's body): stored like the top level
        return {"class": GRAPH_CLASS, **_graph_record(module, tensors, f"{path}.", where)}
    cls_name = _class_name(type(module))
    resolve_module_class(cls_name, where)
    hooks = [
        k
        for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")
        if getattr(module, k, None)
    ]
    if hooks:
        raise SerializationError(f"{where}has hooks ({', '.join(hooks)}); hooks cannot be saved as data")
    attrs = {}
    transient = getattr(type(module), "TRANSIENT_ATTRS", ())  # caches a class rebuilds on use
    for key, value in module.__dict__.items():
        if key in _INIT_KEYS or key.startswith("__") or key in transient:
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
    return {
        "class": cls_name,
        "training": module.training,
        "attrs": attrs,
        "params": params,
        "buffers": buffers,
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": {k: _module_record(c, f"{path}.{k}", tensors) for k, c in module._modules.items() if c is not None},
    }


# ---------------------------------------------------------------- graph
def _target_record(node: fx.Node) -> Any:
    where = f"node '{node.name}' ({node.op}): "
    if node.op == "call_function":
        name = function_name(node.target)
        resolve_function(name, where)
        return name
    if node.op == "call_method" and not allow_list.allowed_method(node.target):
        raise SerializationError(f"{where}method '{node.target}' is not a torch.Tensor method")
    return node.target


def _graph_record(gm: fx.GraphModule, tensors: dict, prefix: str = "", where: str = "") -> dict:
    """``gm``'s graph, modules and ``get_attr`` tensors as plain data (tensors into ``tensors``, keyed under
    ``prefix``)."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise SerializationError(
            f"{where}graph uses {type(gm.graph._codegen).__name__}; only the default codegen "
            "(no pytree inputs/outputs) can be saved"
        )
    nodes, modules, attrs = _encode_graph(gm, tensors, prefix)
    return {
        "class_name": type(gm).__name__,
        "training": gm.training,
        "graph": nodes,
        "modules": modules,
        "attrs": attrs,
    }


def _encode_graph(gm: fx.GraphModule, tensors: dict, prefix: str = "") -> tuple[list, dict, dict]:
    nodes, modules, attrs = [], {}, {}
    for node in gm.graph.nodes:
        where = f"{prefix}node '{node.name}' ({node.op}): "
        target = _target_record(node)
        if node.op == "call_function":
            _check_getattr(node.name, node.target, node.args, node.kwargs)
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = _module_record(gm.get_submodule(node.target), prefix + node.target, tensors)
        if node.op == "get_attr" and node.target not in attrs:
            value = _fetch_attr(gm, node.target, where)
            key = f"attr:{prefix}{node.target}"
            tensors[key] = value.detach()
            attrs[node.target] = {
                "key": key,
                "param": isinstance(value, nn.Parameter),
                "grad": bool(value.requires_grad),
            }
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": target,
                "args": _encode(node.args, where),
                "kwargs": _encode(node.kwargs, where),
            }
        )
    return nodes, modules, attrs


def _fetch_attr(gm: fx.GraphModule, target: str, where: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise SerializationError(f"{where}get_attr '{target}' is a {type(obj).__name__}, not a tensor")
    return obj


def _check_getattr(name: str, fn: Callable, args: tuple, kwargs: dict) -> None:
    try:
        _check_call(name, "call_function", fn, args, kwargs)
    except SerializationError as exc:
        raise SerializationError(f"{exc}; such a graph cannot be saved") from None


# ---------------------------------------------------------------- public API
def to_payload(gm: fx.GraphModule) -> dict:
    """The plain-data form of ``gm`` (what :func:`save` writes)."""
    if not isinstance(gm, fx.GraphModule):
        raise SerializationError(f"save needs a torch.fx.GraphModule (trace the model first), got {type(gm).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    record = _graph_record(gm, tensors)
    meta = {}
    for key, value in gm.meta.items():
        try:
            meta[key] = _encode(value, "")
        except SerializationError:
            log.info("gm.meta[%r] (%s) is not plain data; not saved", key, type(value).__name__)
    return {
        "format": FORMAT,
        "version": VERSION,
        **record,
        "meta": meta,
        "tensors": tensors,
    }


def from_payload(payload: Any, limits: LoadLimits = LoadLimits()) -> fx.GraphModule:
    """Rebuild a GraphModule from plain data; everything is validated before any source is generated."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SerializationError("not a sparsifx GraphModule file")
    if payload.get("version") != VERSION:
        raise SerializationError(
            f"unsupported file version {str(payload.get('version'))[:20]!r}; this sparsifx reads version {VERSION}"
        )
    try:
        reader = PayloadReader(payload, limits)
        gm = reader.graph_module(payload)  # generates and compiles source only after every name was checked
        meta = {k: reader.decode(v, f"meta '{k}': ") for k, v in payload["meta"].items() if isinstance(k, str)}
    except SerializationError:
        raise
    except RecursionError as exc:
        raise SerializationError("malformed sparsifx file: nested too deeply") from exc
    except Exception as exc:  # a malformed file must never escape as another type
        raise SerializationError(f"malformed sparsifx file: {type(exc).__name__}: {_first_line(exc)}") from exc
    gm.meta.update(meta)
    return gm


def save(module: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``module`` (a GraphModule, e.g. a shrunk model) to ``path`` as data + tensors.

    The file loads with ``torch.load(path, weights_only=True)``; :func:`load` rebuilds the module
    without the model's Python class. Raises :class:`SerializationError` naming the node or module that
    cannot be stored (unknown function or module class, non-plain attribute, hooks). The file is written
    to a temporary name beside ``path``, read back with :func:`load`, and only then renamed into place.
    """
    payload = to_payload(module)
    atomic_write(path, lambda tmp: torch.save(payload, tmp), check_fn=lambda tmp: load(tmp))


def load(path: str | os.PathLike, map_location: Any = None, limits: LoadLimits = LoadLimits()) -> fx.GraphModule:
    """Read a file written by :func:`save` (never unpickles code; allow-listed targets only).

    Size and shape limits (``limits``) are checked before the archive is read; every malformed,
    truncated or foreign file raises :class:`SerializationError`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise SerializationError(f"load needs a file path, got {type(path).__name__}")
    _check_archive(path, limits)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the weights-only unpickler and the zip reader raise many types
        raise SerializationError(
            f"cannot read '{path}' as a weights-only file (no code is unpickled): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    return from_payload(payload, limits)


def _check_archive(path: str | os.PathLike, limits: LoadLimits) -> None:
    """A plain (stored, uncompressed) zip within the size and entry limits, as ``torch.save`` writes."""
    try:
        size = os.stat(path).st_size
        if size > limits.max_file_bytes:
            raise SerializationError(f"'{path}' is {size} bytes; the load limit is {limits.max_file_bytes}")
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except SerializationError:
        raise
    except Exception as exc:  # zipfile raises many types on a malformed archive (NotImplementedError, ...)
        raise SerializationError(
            f"cannot read '{path}' as a sparsifx file (a torch.save zip archive): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if len(entries) > limits.max_entries:
        raise SerializationError(f"'{path}' has {len(entries)} archive entries; the limit is {limits.max_entries}")
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise SerializationError(f"'{path}' has compressed entries; torch.save writes none (refused: zip bomb)")
    if sum(e.file_size for e in entries) > limits.max_file_bytes:
        raise SerializationError(f"'{path}' declares more data than the load limit {limits.max_file_bytes}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


__all__ = ["save", "load", "register_module_class", "register_function", "SerializationError", "LoadLimits"]
