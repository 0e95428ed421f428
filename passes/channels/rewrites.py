"""Graph constants that depend on channel counts, rewritten by ``shrink`` (``REWRITES`` by kind).

``kept(atoms) -> bool array`` says which positions survive. Kinds: ``sizes`` (view/reshape/expand: the
size of the channel dim becomes the kept count), ``split`` (split/chunk become ``torch.split`` with the
kept count of every piece), ``slice`` (a ``x[..., a:b]`` on the channel dim gets renumbered bounds).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from sparsifx.registry import Registry

from .rules_shape import size_args, varying_dim

REWRITES: Registry[Callable] = Registry("channel rewrite")
Kept = Callable[[torch.Tensor], np.ndarray]


@REWRITES.register("sizes")
def rewrite_sizes(node: fx.Node, data: dict, kept: Kept) -> bool:
    labels = data["labels"]
    d = varying_dim(labels)
    new = int(kept(labels.reshape(-1)).sum())
    args = list(node.args)
    sizes, put = size_args(node)  # a literal list: the rule records no rewrite for a computed shape
    if sizes[d] == -1 or sizes[d] == new:
        return False
    sizes[d] = new
    if put == "varargs":
        node.args = (args[0], *sizes)
    elif put == "tuple" or len(args) > 1:
        node.args = (args[0], tuple(sizes), *args[2:])
    else:
        node.kwargs = {**node.kwargs, "shape": tuple(sizes)}
    return True


@REWRITES.register("split")
def rewrite_split(node: fx.Node, data: dict, kept: Kept) -> bool:
    vec, dim = data["vec"], data["dim"]
    sizes = data["sizes"]
    keep = kept(vec)
    bounds = np.cumsum([0] + sizes)
    new = [int(keep[bounds[i] : bounds[i + 1]].sum()) for i in range(len(sizes))]
    if new == sizes:
        return False
    src = node.args[0] if node.args else node.kwargs.get("tensor", node.kwargs.get("input"))
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (src, new), {"dim": dim}
    return True


@REWRITES.register("slice")
def rewrite_slice(node: fx.Node, data: dict, kept: Kept) -> bool:
    vec, pos = data["vec"], data["pos"]
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    old = items[pos]
    start, stop, _ = old.indices(vec.numel())
    keep = kept(vec)
    new = slice(int(keep[:start].sum()), int(keep[:stop].sum()), None)
    if (new.start, new.stop) == (start, stop):
        return False
    items[pos] = new
    node.args = (node.args[0], tuple(items) if isinstance(idx, tuple) else items[0])
    return True
