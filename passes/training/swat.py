"""Pass ``swat``: Sparse Weight Activation Training (Raihan & Aamodt 2020; docs/algorithms.md#swat).

``linear(x) -> swat_linear(x, W, k)`` and ``conv(x) -> swat_conv(x, W, k)``: forward with Top-K weights
and dense activations, input gradient with the Top-K weights, weight gradient from Top-K activations
(stored compressed: packed 1-bit mask + kept values), dense-shaped weight gradient applied by the
unchanged optimizer to the dense weights. ReLUs become ``LeanReLU`` (1-bit saved mask) and
``MaxPool2d`` becomes ``LeanMaxPool2d`` (int32 indices only) so their dense saved copies do not
cancel the saving. What stays dense for backward: BatchNorm inputs (its backward needs the exact
normalised input, which no exact compressed form gives), inputs of excluded layers, other ops' own
saves (avg-pool inputs, GELU/SiLU/ReLU6, LayerNorm, attention, the loss), and the model's parameters.
Departures from the reference: ``warmup_steps`` counts steps, not epochs, and the recompute period
counts training calls since the pass, not the batch index within the epoch. Usage (``net``, a batch ``x, y``)::

    import torch, torch.nn.functional as F, sparsifx
    from sparsifx.accounting import saved_tensor_bytes, training_flops
    gm = sparsifx.sparsify(net, {"stages": [{"pass": "swat", "sparsity": 0.9}]}, example_inputs=(x,))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    sparsifx.attach(gm, opt)                     # steps the SWAT controller (variant "momentum" needs it)
    for _ in range(2):                            # a plain training loop: nothing else changes
        opt.zero_grad(); F.cross_entropy(gm(x), y).backward(); opt.step()
    kept = saved_tensor_bytes(gm.train(), (x,), lambda out: F.cross_entropy(out, y))  # bytes kept for backward
    ratio = training_flops(gm, (x,)).ratio       # forward W, input-grad W and weight-grad x sparse, vs dense
    final = sparsifx.sparsify(gm, {"stages": [{"pass": "swat_finalize"}]})  # plain layers: export_onnx, compact

Parameters: ``sparsity`` (global S; per-layer overrides through ``by_name`` etc.), ``variant``
(``unstructured`` | ``erk`` | ``momentum`` | ``structured``), ``topk_period`` (threshold recompute
period for convs, CIFAR default 10; Linear layers recompute every call), ``warmup_steps`` (steps of
exact per-step Top-K; the reference counts epochs), ``exact`` (index-based Top-K on recompute steps),
``dense_first_layer`` (default True) / ``dense_last_layer`` (default False) as the CIFAR SWAT-U config
(its ERK configs sparsify both: set ``dense_first_layer: false``; the deprecated ``sparsify_first_layer`` /
``sparsify_last_layer``, their negations, still work with a ``DeprecationWarning``), ``lean_relu`` and
``lean_maxpool`` (replace every ReLU / MaxPool2d: both are numerically identical, so all of them are
replaced rather than only SWAT neighbours). Biases and BatchNorm are never sparsified.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx import validate
from sparsifx.distributions import layer_sparsities
from sparsifx.errors import PreconditionError, RecipeError, UnsupportedOpError
from sparsifx.meta_keys import SPARSE_CONTROLLER, SWAT_STATE
from sparsifx.module_utils import set_submodule, swap_class
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection, renamed_exclusion_keys

from .swat_control import SWATController
from .swat_layers import SWAT_TYPES, LeanMaxPool2d, LeanReLU, SWATLayerConfig, is_swat

log = logging.getLogger(__name__)

VARIANTS = ("unstructured", "erk", "momentum", "structured")
RELU_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}
RELU_METHODS = {"relu": False, "relu_": True}


def _free_name(gm: nn.Module, stem: str) -> str:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


@register_pass("swat")
class SWAT(PassBase):
    """``conv/linear(x) -> swat_conv/swat_linear(x, W, k)`` plus lean ReLU / MaxPool (module docstring)."""

    in_place = True
    layer_params = ("sparsity",)

    def __init__(
        self,
        *,
        sparsity: float = 0.9,
        variant: str = "unstructured",
        topk_period: int = 10,
        warmup_steps: int = 0,
        exact: bool = False,
        dense_first_layer: bool | None = None,
        dense_last_layer: bool | None = None,
        lean_relu: bool = True,
        lean_maxpool: bool = True,
        storage: str = "masked",
        selection: LayerSelection | None = None,
        sparsify_first_layer: bool | None = None,
        sparsify_last_layer: bool | None = None,
    ):
        if validate.choice("storage", storage, ("masked", "sparse")) == "sparse":
            raise RecipeError(
                "swat cannot use storage: sparse: it re-selects the top-k of the dense weight every "
                "topk_period steps, so the dense weight must exist; use storage: masked, or a DST "
                "method (static, set, rigl, gmp) with storage: sparse",
                "storage",
            )
        self.sparsity = validate.number("sparsity", sparsity, 0.0, 1.0, hi_open=True)
        self.variant = validate.choice("variant", variant, VARIANTS)
        self.topk_period = validate.integer("topk_period", topk_period, 1)
        self.warmup_steps = validate.integer("warmup_steps", warmup_steps, 0)
        self.exact = validate.boolean("exact", exact)
        given = {
            k: v
            for k, v in (
                ("dense_first_layer", dense_first_layer),
                ("dense_last_layer", dense_last_layer),
                ("sparsify_first_layer", sparsify_first_layer),
                ("sparsify_last_layer", sparsify_last_layer),
            )
            if v is not None
        }
        given = renamed_exclusion_keys("swat", given)  # None: the default, True first / False last
        self.dense_first_layer = validate.boolean("dense_first_layer", given.get("dense_first_layer", True))
        self.dense_last_layer = validate.boolean("dense_last_layer", given.get("dense_last_layer", False))
        self.lean_relu = validate.boolean("lean_relu", lean_relu)
        self.lean_maxpool = validate.boolean("lean_maxpool", lean_maxpool)
        self.selection = (selection or LayerSelection()).with_defaults(("Conv2d", "Linear"))

    # -- which layers, which sparsity ------------------------------------------------------------------------
    def targets(self, gm: fx.GraphModule) -> dict[str, nn.Module]:
        """Selected layers called by the graph, minus the first/last exclusions (order: ``named_parameters``).

        A selected layer that no ``call_module`` node calls (inside an opaque leaf, or read directly by its
        parent like ``MultiheadAttention.out_proj``) cannot be rewritten: it is left dense and listed in
        ``self.skipped`` (then ``gm.meta["swat"]["skipped"]``)."""
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        chosen = {n: m for n, m in self.selection.layers(gm) if getattr(m, "weight", None) is not None}
        self.skipped = {n: "not called as a graph node" for n in chosen if n not in called}
        for name in self.skipped:
            log.info("swat: layer %s is not called as a graph node; left dense", name)
        order = {id(p): i for i, (_, p) in enumerate(gm.named_parameters())}
        names = sorted((n for n in chosen if n in called), key=lambda n: order.get(id(chosen[n].weight), 0))
        if names and self.dense_first_layer:
            names = names[1:]
        if names and self.dense_last_layer:
            names = names[:-1]
        for name in names:
            module = chosen[name]
            if is_swat(module):
                raise PreconditionError(f"layer '{name}' is already a SWAT layer; run swat once")
            if type(module) not in SWAT_TYPES:
                raise UnsupportedOpError(
                    f"swat supports {', '.join(t.__name__ for t in SWAT_TYPES)} (exact types; "
                    f"a masked layer must be baked first)",
                    module=name,
                )
        return {n: chosen[n] for n in names}

    def layer_sparsity(self, targets: dict[str, nn.Module]) -> dict[str, float]:
        custom = {
            n: self.selection.overrides(n, m)["sparsity"]
            for n, m in targets.items()
            if "sparsity" in self.selection.overrides(n, m)
        }
        if self.variant == "erk":
            shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
            return layer_sparsities(shapes, self.sparsity, "erk", custom=custom)
        return {n: float(custom.get(n, self.sparsity)) for n in targets}

    def layer_config(self, module: nn.Module) -> SWATLayerConfig:
        return SWATLayerConfig(
            structured=self.variant == "structured",
            exact=self.exact,
            period=self.topk_period,
            warmup_steps=self.warmup_steps,
            every_call=isinstance(module, nn.Linear),
        )

    # -- the rewrite -----------------------------------------------------------------------------------------
    def call(self, gm: fx.GraphModule) -> PassResult:
        targets = self.targets(gm)
        sparsity = self.layer_sparsity(targets)
        for name, module in targets.items():
            new = swap_class(module, SWAT_TYPES[type(module)])
            new._init_swat(sparsity[name], self.layer_config(module))
            set_submodule(gm, name, new)
            log.debug("swat: %s -> %s (s=%.4f)", name, type(new).__name__, sparsity[name])
        modified = bool(targets)
        if self.lean_relu:
            modified |= self._lean_relus(gm)
        if self.lean_maxpool:
            modified |= self._lean_maxpools(gm)
        if targets:
            gm.meta[SWAT_STATE] = {
                "sparsity": self.sparsity,
                "variant": self.variant,
                "layers": dict(sparsity),
                "skipped": dict(self.skipped),
            }
            gm.meta[SPARSE_CONTROLLER] = SWATController(gm, list(targets), self.variant, self.sparsity)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    @staticmethod
    def _lean_relus(gm: fx.GraphModule) -> bool:
        """ReLU modules are swapped for ``LeanReLU``; functional/method ReLUs become calls of a new
        ``LeanReLU`` submodule (``swat_relu_<i>``: a tracing leaf, so the graph retraces)."""
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ReLU:
                set_submodule(gm, node.target, swap_class(gm.get_submodule(node.target), LeanReLU))
                changed = True
                continue
            if node.op == "call_function" and node.target in RELU_FUNCTIONS:
                inplace = (
                    RELU_FUNCTIONS[node.target]
                    or bool(node.kwargs.get("inplace", False))
                    or (len(node.args) > 1 and bool(node.args[1]))
                )
            elif node.op == "call_method" and node.target in RELU_METHODS:
                inplace = RELU_METHODS[node.target]
            else:
                continue
            name = _free_name(gm, "swat_relu")
            gm.add_submodule(name, LeanReLU(inplace=inplace))
            node.op, node.target, node.args, node.kwargs = "call_module", name, (node.args[0],), {}
            changed = True
        return changed

    @staticmethod
    def _lean_maxpools(gm: fx.GraphModule) -> bool:
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if type(module) is nn.MaxPool2d and not module.return_indices:
                set_submodule(gm, node.target, swap_class(module, LeanMaxPool2d))
                changed = True
        return changed


def swat_controller(model: nn.Module) -> SWATController:
    """The controller the ``swat`` pass stored on ``model`` (``gm.meta["sparse_controller"]``)."""
    root = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    ctrl = getattr(root, "meta", {}).get("sparse_controller")
    if not isinstance(ctrl, SWATController):
        raise PreconditionError("model has no SWAT controller: run the 'swat' pass on it first")
    return ctrl
