"""What a saved file may name: individual functions, Tensor methods, attributes and module classes.

Nothing here imports or looks up a name taken from a file. Every allowed function is collected once, from
code, into a table keyed by qualified name; a file's name is only ever a key into that table. Names that end
up in the generated ``forward`` source (placeholders, module paths, keyword names) are checked part by part.

- functions: torch's tensor operators (those taking part in the ``__torch_function__`` protocol in
  ``torch``, ``torch.nn.functional``, ``torch.linalg``, ``torch.special``, ``torch.fft``), a few tensor
  factories, named ``operator``/``math``/builtins functions, named torchvision functions, and what the user
  registers. No whole module, and no function that takes a callable.
- ``getattr`` nodes: public data attributes only (``x.shape``, ``x.dtype``, a named-tuple field), never a
  method, a private name or an autograd object.
"""

from __future__ import annotations

import functools
import keyword
import math
import operator
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.fx.node import _get_qualified_name

_TORCH_OP_NAMESPACES = (
    "torch",
    "torch.nn.functional",
    "torch.functional",
    "torch.linalg",
    "torch.special",
    "torch.fft",
)
_TORCH_EXTRA = (
    "_assert",
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "eye",
    "linspace",
    "tensor",
    "rand",
    "randn",
    "randint",
    "finfo",
    "iinfo",
    "scalar_tensor",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
)
_NN_FUNCTIONAL_EXTRA = ("scaled_dot_product_attention",)
# Tensor operators that take a callable argument: refused even though they are tensor operators.
_TAKES_CALLABLE = frozenset({"torch.nn.functional.triplet_margin_with_distance_loss"})
_OPERATOR = (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "matmul",
    "neg",
    "pos",
    "abs",
    "invert",
    "and_",
    "or_",
    "xor",
    "lshift",
    "rshift",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "not_",
    "truth",
    "getitem",
    "setitem",
    "iadd",
    "isub",
    "imul",
    "itruediv",
    "ifloordiv",
    "imod",
    "ipow",
    "imatmul",
    "iand",
    "ior",
    "ixor",
    "ilshift",
    "irshift",
    "concat",
    "contains",
    "index",
    "is_",
    "is_not",
)
_MATH = (
    "sqrt",
    "ceil",
    "floor",
    "trunc",
    "log",
    "log2",
    "log10",
    "exp",
    "pow",
    "prod",
    "isqrt",
    "gcd",
    "lcm",
    "fabs",
    "sin",
    "cos",
    "tan",
    "atan",
    "tanh",
    "erf",
    "isinf",
    "isnan",
    "isfinite",
    "copysign",
)
_BUILTINS = ("getattr", "len", "int", "float", "bool", "abs", "round", "sum", "tuple", "list", "range", "slice")
# min/max run a ``key=`` callable: allowed only without keyword arguments (checked per node).
_BUILTINS_NO_KWARGS = ("min", "max")
_TORCHVISION_FUNCTIONS = {
    "torchvision.models.swin_transformer": (
        "_patch_merging_pad",
        "_get_relative_position_bias",
        "shifted_window_attention",
    ),
    "torchvision.models.video.swin_transformer": (
        "_get_window_and_shift_size",
        "_get_relative_position_bias",
        "_compute_pad_size_3d",
        "_compute_attention_mask_3d",
        "shifted_window_attention_3d",
    ),
    "torchvision.models.googlenet": ("GoogLeNetOutputs",),  # named-tuple outputs (training graphs)
    "torchvision.models.inception": ("InceptionOutputs",),
    "torchvision.models.video.mvit": ("_unsqueeze", "_squeeze", "_add_rel_pos", "_add_shortcut"),
}

EXTRA_FUNCTIONS: dict[str, Callable] = {}
NO_KWARGS_FUNCTIONS = frozenset(f"builtins.{n}" for n in _BUILTINS_NO_KWARGS)


def function_name(fn: Callable) -> str:
    """The qualified name a file stores for ``fn`` (``torch.flatten``, ``operator.add``, ``builtins.len``)."""
    name = _get_qualified_name(fn)
    if name.startswith("_operator."):
        name = name[1:]
    return "builtins." + name if "." not in name else name


@functools.cache  # collected once, on the first lookup
def _collect() -> dict[str, Callable]:
    import builtins

    from torch.overrides import get_overridable_functions

    table: dict[str, Callable] = {}

    def add(fn: Any) -> None:
        if callable(fn):
            name = function_name(fn)
            if name not in _TAKES_CALLABLE:
                table[name] = fn

    overridable = get_overridable_functions()
    for namespace, fns in overridable.items():
        if getattr(namespace, "__name__", None) in _TORCH_OP_NAMESPACES:
            for fn in fns:
                add(fn)
    for name in _TORCH_EXTRA:
        add(getattr(torch, name, None))
    for name in _NN_FUNCTIONAL_EXTRA:
        add(getattr(torch.nn.functional, name, None))
    for name in _OPERATOR:
        add(getattr(operator, name))
    for name in _MATH:
        add(getattr(math, name))
    for name in _BUILTINS + _BUILTINS_NO_KWARGS:
        add(getattr(builtins, name))
    _add_torchvision(add)
    return table


def _add_torchvision(add: Callable[[Any], None]) -> None:
    try:
        import importlib

        import torchvision.ops as tv_ops
    except ImportError:
        return
    for name in getattr(tv_ops, "__all__", ()):
        fn = getattr(tv_ops, name, None)
        if callable(fn) and not isinstance(fn, type):
            add(fn)
    for module_name, names in _TORCHVISION_FUNCTIONS.items():
        module = importlib.import_module(module_name)  # constant names from this file, never from a file
        for name in names:
            add(getattr(module, name, None))


def allowed_function(name: Any) -> Callable | None:
    """The function a file's ``name`` denotes, or None when the allow-list does not name it."""
    if not isinstance(name, str):
        return None
    if name in EXTRA_FUNCTIONS:
        return EXTRA_FUNCTIONS[name]
    return _collect().get(name)


# ---------------------------------------------------------------- Tensor methods and attributes
_DUNDER_METHODS = frozenset(
    f"__{n}__"
    for n in (
        "getitem",
        "add",
        "radd",
        "iadd",
        "sub",
        "rsub",
        "isub",
        "mul",
        "rmul",
        "imul",
        "truediv",
        "rtruediv",
        "floordiv",
        "rfloordiv",
        "matmul",
        "rmatmul",
        "pow",
        "rpow",
        "neg",
        "pos",
        "abs",
        "invert",
        "and",
        "or",
        "xor",
        "mod",
        "lshift",
        "rshift",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "len",
        "bool",
        "float",
        "int",
    )
)
_DENIED_METHODS = frozenset(
    {
        "register_hook",
        "register_post_accumulate_grad_hook",
        "backward",
        "apply_",
        "map_",
        "map2_",
        "share_memory_",
        "pin_memory",
        "tolist",
        "numpy",
        "storage",
        "untyped_storage",
        "data_ptr",
        "set_",
        "resize_",
        "as_subclass",
        "module_load",
        "new_tensor",
        "__reduce_ex__",
    }
)


def allowed_method(name: Any) -> bool:
    """A ``call_method`` target: a public ``torch.Tensor`` method (or an operator dunder)."""
    return (
        isinstance(name, str)
        and callable(getattr(torch.Tensor, name, None))
        and name not in _DENIED_METHODS
        and (not name.startswith("_") or name in _DUNDER_METHODS)
    )


# Attributes of values a graph can hold whose result is code-capable: refused as ``getattr`` targets.
_OBJECT_TYPES = (
    torch.Tensor,
    tuple,
    list,
    dict,
    int,
    float,
    complex,
    str,
    bool,
    torch.Size,
    torch.dtype,
    torch.device,
    object,
)
_DENIED_ATTRIBUTES = frozenset({"grad_fn", "_base", "data_ptr", "untyped_storage"})


def allowed_attribute(name: Any) -> bool:
    """A ``getattr`` node's attribute: a public identifier that is data, never a method on any value type."""
    if not is_identifier(name) or name.startswith("_") or name in _DENIED_ATTRIBUTES:
        return False
    return not any(callable(getattr(t, name, None)) for t in _OBJECT_TYPES)


# ---------------------------------------------------------------- names pasted into generated source
def is_identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and name.isascii() and not keyword.iskeyword(name)


def is_child_name(name: Any) -> bool:
    """A submodule/parameter key: an identifier, or the all-digit name of a Sequential/ModuleList child."""
    return is_identifier(name) or (isinstance(name, str) and name.isascii() and name.isdigit() and len(name) < 10)


def is_module_path(path: Any) -> bool:
    """``layer1.0.conv1``: every dotted part a child name, none private-dunder."""
    return isinstance(path, str) and all(is_child_name(p) and not p.startswith("__") for p in path.split("."))


def is_placeholder_target(name: Any) -> bool:
    """A ``forward`` parameter as fx writes it: ``x``, ``*args`` or ``**kwargs``."""
    return isinstance(name, str) and is_identifier(name.removeprefix("**").removeprefix("*"))


# ---------------------------------------------------------------- module classes
MODULE_CLASSES: dict[str, Any] = {
    "torchvision.ops.stochastic_depth.StochasticDepth": ("torchvision.ops.stochastic_depth", "StochasticDepth"),
    "torchvision.ops.misc.Permute": ("torchvision.ops.misc", "Permute"),
    "torchvision.models.convnext.LayerNorm2d": ("torchvision.models.convnext", "LayerNorm2d"),
    "torchvision.ops.misc.FrozenBatchNorm2d": ("torchvision.ops.misc", "FrozenBatchNorm2d"),
}
for _name in ("MaskedLinear", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d"):
    MODULE_CLASSES[f"sparsifx.masking.{_name}"] = ("sparsifx.masking", _name)
for _name in ("SparseLinear", "SparseConv2d1x1"):
    MODULE_CLASSES[f"sparsifx.sparse_linear.{_name}"] = ("sparsifx.sparse_linear", _name)
# lowered layers (``lower``): their index buffers are validated before a kernel reads them
for _module, _name in (
    ("sparse_modules", "SparseLinear"),
    ("sparse_modules", "SparseConv2d"),
    ("sparse_conv", "DirectSparseConv2d"),
    ("sparse_block", "SparseInvertedResidual"),
    ("fast_pool", "FastMaxPool2d"),
    ("ort_conv", "OrtConv2d"),
    ("ort_graph", "OrtGraph"),
    ("micro_batch", "MicroBatched"),
):
    MODULE_CLASSES[f"sparsifx.backends.{_module}.{_name}"] = (f"sparsifx.backends.{_module}", _name)


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache  # collected once, on the first lookup
def _torch_nn_classes() -> dict[str, type]:
    """Public layer classes defined in ``torch.nn.modules.*`` (incl. ones not re-exported, e.g. MHA's out_proj)."""
    import types

    table = {}
    for sub in vars(nn.modules).values():
        if isinstance(sub, types.ModuleType) and sub.__name__.startswith("torch.nn.modules."):
            for c in vars(sub).values():
                if (
                    isinstance(c, type)
                    and issubclass(c, nn.Module)
                    and c.__module__ == sub.__name__
                    and not c.__name__.startswith("_")
                ):
                    table[class_name(c)] = c
    return table


def allowed_module_class(name: Any) -> type | None:
    """The ``nn.Module`` class a file's ``name`` denotes: public ``torch.nn`` layers, registered classes."""
    if not isinstance(name, str):
        return None
    entry = MODULE_CLASSES.get(name)
    if isinstance(entry, tuple):
        import importlib

        try:
            entry = getattr(importlib.import_module(entry[0]), entry[1])  # constant names from this file
        except (ImportError, AttributeError):
            return None
    if entry is None:
        entry = _torch_nn_classes().get(name)
    ok = isinstance(entry, type) and issubclass(entry, nn.Module) and class_name(entry) == name
    return entry if ok else None
