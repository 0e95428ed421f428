"""Pass ``all_relu``: the All-ReLU activation of Truly Sparse Neural Networks at Scale
(docs/algorithms.md#all-relu)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx import validate
from sparsifx.errors import RecipeError
from sparsifx.module_utils import set_submodule
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.serialization import register_module_class
from sparsifx.tracing import register_leaf_type

log = logging.getLogger(__name__)

# what counts as a ReLU node: module classes, call_function targets, call_method names
RELU_MODULES: tuple[type, ...] = (nn.ReLU,)
RELU_FUNCTIONS: tuple = (F.relu, torch.relu, torch.relu_, F.relu_)
RELU_METHODS: tuple[str, ...] = ("relu", "relu_")


@register_module_class
@register_leaf_type
class AllReLU(nn.LeakyReLU):
    """``f(z) = z if z >= 0 else slope·z`` with a fixed (not trained) ``slope`` of either sign; the derivative is
    1 for z > 0 and ``slope`` otherwise (as the reference's ``AlternatedLeftReLU``). A ``LeakyReLU`` whose negative
    slope may be negative, so every rule written for ``nn.LeakyReLU`` (channel coupling, zero preservation, ONNX
    ``LeakyRelu``) applies to it."""

    def __init__(self, slope: float):
        super().__init__(negative_slope=float(slope))

    @property
    def slope(self) -> float:
        return self.negative_slope

    def extra_repr(self) -> str:
        return f"slope={self.negative_slope}"


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module) in RELU_MODULES
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in RELU_METHODS


def _free_name(gm: fx.GraphModule, base: str) -> str:
    names = (
        {n for n, _ in gm.named_modules()} | {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    )
    name, i = base, 0
    while name in names or hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


@register_pass("all_relu")
class AllReLUPass(PassBase):
    """``relu(x) -> all_relu(x, a_l)``: the l-th ReLU of the graph (0-based, graph order; an MLP's hidden
    activations) becomes ``AllReLU(a_l)``, ``f(z) = z if z >= 0 else a_l·z``, with ``a_l = -slope`` for even l
    and ``+slope`` for odd l (the reference's MNIST ``(-0.6, +0.6, -0.6)``).

    Rewrites ``nn.ReLU`` modules, ``F.relu``/``torch.relu`` calls and ``x.relu()``. A ReLU module called once is
    replaced under its own name; a ReLU module called several times (each call gets its own slope) and a
    functional ReLU get a new submodule ``all_relu<l>``. Parameters: ``slope`` (> 0, default 0.6);
    ``slopes`` (a list of one slope per ReLU, any sign; overrides ``slope``; its length must equal the number
    of ReLUs found). Not semantics-preserving.
    """

    in_place = True
    preserves_semantics = False

    def __init__(self, slope: float = 0.6, slopes: Sequence[float] | None = None):
        self.slope = validate.number("slope", slope, 0.0, lo_open=True)
        if slopes is None:
            self.slopes = None
        else:
            if not isinstance(slopes, (list, tuple)) or not slopes:
                raise RecipeError(
                    "must be a non-empty list of numbers", "slopes", validate.shown(slopes), "e.g. [-0.6, 0.6, -0.6]"
                )
            self.slopes = tuple(validate.number(f"slopes[{i}]", s) for i, s in enumerate(slopes))

    def slopes_for(self, count: int) -> list[float]:
        """The slope of each of ``count`` ReLUs (graph order)."""
        if self.slopes is None:
            return [-self.slope if i % 2 == 0 else self.slope for i in range(count)]
        if len(self.slopes) != count:
            raise RecipeError(
                f"the model has {count} ReLU activations, slopes gives {len(self.slopes)}",
                "slopes",
                allowed=f"a list of {count} numbers",
            )
        return list(self.slopes)

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = [n for n in gm.graph.nodes if _is_relu(gm, n)]
        if not nodes:
            log.warning("pass 'all_relu': the model has no ReLU to rewrite")
            return PassResult(gm, False)
        slopes = self.slopes_for(len(nodes))
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        replaced_modules = set()
        for i, (node, slope) in enumerate(zip(nodes, slopes)):
            module = AllReLU(slope)
            if node.op == "call_module" and calls[node.target] == 1:
                module.train(gm.get_submodule(node.target).training)
                set_submodule(gm, node.target, module)
                continue
            if node.op == "call_module":
                replaced_modules.add(node.target)
            name = _free_name(gm, f"all_relu{i}")
            gm.add_submodule(name, module)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        for target in replaced_modules:
            if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
                gm.delete_submodule(target)
        gm.recompile()
        log.info("pass 'all_relu': %d ReLUs rewritten with slopes %s", len(nodes), slopes)
        return PassResult(gm, True)
