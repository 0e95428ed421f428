"""The original class of every module path of a traced model, kept as plain strings in ``gm.meta``.

When fx traces *into* a module (timm's ``StdConv2d``: an ``nn.Conv2d`` subclass whose forward calls
``F.conv2d`` on a standardised weight), the GraphModule keeps that module only as a bare ``nn.Module``
container holding its tensors. ``gm.meta["module_classes"]`` remembers what it was::

    {"stem.conv": ["timm.layers.std_conv.StdConv2d", "StdConv2d", "Conv2d", "_ConvNd", "Module"], ...}

(qualified class name, then the class names of its MRO without ``object``), so a layer selection can
count the container as a ``Conv2d`` the way ``isinstance`` would. The record is data (saved by
``sparsifx.save``) and is consulted only for modules that *are* bare containers now: a module a pass has
replaced since (a ``Masked*`` layer, a shrunk conv) is typed by its own class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .meta_keys import MODULE_CLASSES

META_KEY = MODULE_CLASSES


def class_record(cls: type) -> list[str]:
    """``[qualified name, *MRO class names]`` of ``cls`` (``object`` left out)."""
    return [f"{cls.__module__}.{cls.__qualname__}"] + [c.__name__ for c in cls.__mro__ if c is not object]


def _valid(entry: Any) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) >= 2 and all(isinstance(s, str) for s in entry)


def recorded(root: nn.Module) -> dict[str, list[str]]:
    """``root.meta["module_classes"]`` (empty when ``root`` has none or it is malformed)."""
    table = getattr(root, "meta", None)
    table = table.get(META_KEY) if isinstance(table, dict) else None
    return table if isinstance(table, dict) else {}


def record_module_classes(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Store the class of every module of ``model`` that ``gm`` keeps, by path, in ``gm.meta``.

    ``model`` may itself be a traced module (``retrace``): its bare containers keep the class it recorded."""
    previous = recorded(model)
    kept = {name for name, _ in gm.named_modules() if name}
    table: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if path not in kept:
            continue
        old = previous.get(path)
        table[path] = list(old) if type(module) is nn.Module and _valid(old) else class_record(type(module))
    gm.meta[META_KEY] = table


def is_container(root: nn.Module, path: str, module: nn.Module) -> bool:
    """Whether ``module`` at ``path`` is a bare container standing for a module the tracer traced into."""
    return type(module) is nn.Module and _valid(recorded(root).get(path))


def type_names(root: nn.Module, path: str, module: nn.Module, use_record: bool = True) -> tuple[str, ...]:
    """The class names ``module`` (at ``path`` of ``root``) matches by type: its MRO's, or for a bare
    container the recorded class's MRO (with ``use_record``)."""
    if use_record and type(module) is nn.Module:
        entry = recorded(root).get(path)
        if _valid(entry):
            return tuple(entry[1:])
    return tuple(c.__name__ for c in type(module).__mro__)


def class_name(root: nn.Module, path: str, module: nn.Module) -> str:
    """The short class name to show for ``module``: the recorded one for a bare container."""
    return type_names(root, path, module)[0]
