"""Analysis ``macs`` and ``COST_RULES``: the one table of op cost rules (multiply-accumulates per op).

Both the report (``sparsifx.report``: MACs/FLOPs per layer from traced shapes) and the training accounting
(``sparsifx.accounting``, ``sparsifx.passes.training.flops``: forward hooks on Conv/Linear layers) count with
these rules. Keys (``sparsifx.registry``):

* a module type, by qualified name (``type_key``; looked up along the MRO): ``rule(module, arg_shapes,
  kwarg_shapes, out_shape) -> (macs, density source)``, the density source being the module (its ``weight``
  governs the sparse MACs) or ``None`` (an op between activations);
* a function or method name (``"matmul"``, ``"conv2d"``, ``"add"``): ``rule(node, module, shape) -> (macs,
  density source)`` with ``shape(arg)`` the recorded shape of a node argument (``None`` when unknown) and the
  density source the qualified name of the weight parameter it reads (``get_attr``) or ``None``.

Ops without a rule count 0 MACs (elementwise, pooling, reshapes). FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..meta_keys import MACS, TENSOR_META
from ..registry import Registry, type_key, type_registry_lookup
from . import register_analysis

ShapeOf = Callable[[Any], "tuple | None"]
ModuleRule = Callable[[nn.Module, list, dict, "tuple | None"], "tuple[int, Any]"]
OpRule = Callable[[fx.Node, "nn.Module | None", ShapeOf], "tuple[int, Any]"]
COST_RULES: Registry[Callable] = Registry("MAC rule")

# the layers the training accounting charges (forward, input-gradient and weight-gradient products)
SPARSE_LINEAR_KEYS = ("sparsifx.sparse_linear.SparseLinear", "sparsifx.backends.sparse_modules.SparseLinear")
TRAINED_LAYER_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


# ---- module rules --------------------------------------------------------------------------------------------
def _conv_module(m, args, kwargs, out):
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return _numel(args[0] if args else None) * (m.out_channels // m.groups) * math.prod(m.kernel_size), m
    return _numel(out) * (m.in_channels // m.groups) * math.prod(m.kernel_size), m


COST_RULES.register(nn.modules.conv._ConvNd, _conv_module)


def _linear_module(m, args, kwargs, out):
    return _numel(out) * m.in_features, m


for _key in (nn.Linear, *SPARSE_LINEAR_KEYS):
    COST_RULES.register(_key, _linear_module)


@COST_RULES.register(nn.Bilinear)
def _bilinear_module(m, args, kwargs, out):
    return _numel(out) * m.in1_features * m.in2_features, m


def _affine_elementwise(m, args, kwargs, out):
    """y = x * a + b: one MAC per output element."""
    return _numel(out), None


for _norm in (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    getattr(nn, "RMSNorm", None),
):
    if _norm is not None:
        COST_RULES.register(_norm, _affine_elementwise)


def _no_macs_module(m, args, kwargs, out):
    """Lookups."""
    return 0, None


for _lookup in (nn.Embedding, nn.EmbeddingBag):
    COST_RULES.register(_lookup, _no_macs_module)


@COST_RULES.register(nn.MultiheadAttention)
def _mha_module(m, args, kwargs, out):
    shapes = list(args) + [kwargs.get(k) for k in ("query", "key", "value")[len(args) :]]
    q, k, v = shapes[:3]
    e = m.embed_dim
    nq, nk = _numel(q) // q[-1], _numel(k) // k[-1]
    proj = nq * e * e + nk * m.kdim * e + nk * m.vdim * e + nq * e * e
    keys = k[1] if m.batch_first and len(k) == 3 else k[0]  # key sequence length
    return proj + 2 * nq * keys * e, None


# ---- function / method rules ---------------------------------------------------------------------------------
def _no_macs(node, m, shape):
    """Elementwise arithmetic with a parameter (biases, position embeddings), indexing."""
    return 0, None


for _name in ("add", "sub", "mul", "truediv", "iadd", "cat", "expand", "getitem", "_get_relative_position_bias"):
    COST_RULES.register(_name, _no_macs)


def _contract(node, m, shape):
    """a @ b: output elements x the contracted size (last dim of a)."""
    a = shape(node.args[0])
    return _numel(shape(node)) * (a[-1] if a else 1), None


for _fn in ("matmul", "bmm", "mm", "__matmul__"):
    COST_RULES.register(_fn, _contract)


@COST_RULES.register("addmm")
@COST_RULES.register("baddbmm")
def _addmm(node, m, shape):
    a = shape(node.args[1])
    return _numel(shape(node)) * (a[-1] if a else 1), None


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def param_of(node: fx.Node, arg) -> Any:
    """The tensor a ``get_attr`` argument of ``node`` reads (``None`` for any other argument)."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return _get_attr(node.graph.owning_module, arg.target)
    return None


def _weight_key(arg) -> str | None:
    """The qualified parameter name a functional op reads its weight from (a ``get_attr`` node)."""
    return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


@COST_RULES.register("linear")
def _linear_fn(node, m, shape):
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return _numel(shape(node)) * shape(w)[-1], _weight_key(w)


def _conv_fn(node, m, shape):
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    ws = shape(w)
    return _numel(shape(node)) * _numel(ws[1:]), _weight_key(w)


for _fn in ("conv1d", "conv2d", "conv3d"):
    COST_RULES.register(_fn, _conv_fn)


@COST_RULES.register("scaled_dot_product_attention")
def _sdpa(node, m, shape):
    q, k = shape(node.args[0]), shape(node.args[1])
    return 2 * _numel(q) * k[-2], None


@COST_RULES.register("shifted_window_attention")
def _swin_attention(node, m, shape):
    """torchvision Swin: qkv and output projections over all tokens plus attention inside windows."""
    x, qkv_w, proj_w = (shape(a) for a in node.args[:3])
    tokens, c = _numel(x) // x[-1], x[-1]
    window = math.prod(node.args[4])
    return tokens * c * qkv_w[0] + 2 * tokens * window * c + tokens * proj_w[1] * proj_w[0], None


# ---- lookups -------------------------------------------------------------------------------------------------
def shape_of(arg: Any) -> tuple | None:
    """The recorded shape of a node argument (``node.meta["tensor_meta"]``), ``None`` when unknown."""
    meta = arg.meta.get(TENSOR_META) if isinstance(arg, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The cost rule of ``module``'s type or its nearest registered base class."""
    return type_registry_lookup(COST_RULES, module)


def _module_node_rule(rule: ModuleRule) -> OpRule:
    def node_rule(node, m, shape):
        return rule(m, [shape(a) for a in node.args], {k: shape(v) for k, v in node.kwargs.items()}, shape(node))

    return node_rule


def rule_for(node: fx.Node, root: nn.Module) -> tuple[OpRule | None, nn.Module | None]:
    """The cost rule of a graph node as ``rule(node, module, shape)`` (module type along the MRO, else the
    function/method name), and the module it calls."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        rule = module_rule(module)
        return (_module_node_rule(rule) if rule is not None else None), module
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.target is operator.matmul:
            name = "matmul"
        return (COST_RULES.get(name) if name in COST_RULES else None), None
    return None, None


def _trained_layer(module: nn.Module) -> bool:
    return isinstance(module, TRAINED_LAYER_TYPES) or any(
        type_key(c) in SPARSE_LINEAR_KEYS for c in type(module).__mro__
    )


def layer_macs_rule(module: nn.Module) -> Callable[[nn.Module, torch.Tensor], int] | None:
    """``rule(module, output) -> MACs of one forward`` for a layer the training accounting charges (Conv1d/2d/3d,
    Linear, SparseLinear and their subclasses; dense-equivalent MACs), else ``None``."""
    rule = module_rule(module) if _trained_layer(module) else None
    if rule is None:
        return None
    return lambda m, out: rule(m, [], {}, tuple(out.shape))[0]


# ---- the analysis --------------------------------------------------------------------------------------------
def _has_macs(gm: fx.GraphModule) -> bool:
    return any(MACS in n.meta for n in gm.graph.nodes)


@register_analysis(
    "macs",
    key=MACS,
    present=_has_macs,
    needs_inputs=False,
    remedy="record shapes first (the 'shapes' analysis: pass example_inputs)",
)
def macs(gm: fx.GraphModule, example_inputs=None) -> None:
    """``node.meta["macs"] = (MACs, density source)`` for every node with a cost rule whose shapes are known."""
    from .shapes import record_shapes, shapes_present

    if example_inputs is not None and not shapes_present(gm):
        record_shapes(gm, example_inputs)
    for node in gm.graph.nodes:
        node.meta.pop(MACS, None)
        rule, module = rule_for(node, gm)
        if rule is None:
            continue
        try:
            node.meta[MACS] = rule(node, module, shape_of)
        except (TypeError, IndexError, AttributeError):  # a shape the rule cannot read
            continue
