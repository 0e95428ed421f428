"""Small helpers for replacing modules inside a model (used by every pass that swaps layers)."""
from __future__ import annotations

import torch.nn as nn


def swap_class(module: nn.Module, new_cls: type) -> nn.Module:
    """A new object of ``new_cls`` sharing ``module``'s parameters, buffers and attributes."""
    new = new_cls.__new__(new_cls)
    new.__dict__ = module.__dict__.copy()
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(module.__dict__[key])
    return new


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
