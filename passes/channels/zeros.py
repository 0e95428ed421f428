"""Which node outputs are provably zero at pruned channels once ``channel_prune`` zeroed the units.

A producer (conv/linear/embedding with zeroed rows and bias), an affine BatchNorm with zeroed
gamma/beta and a zeroed parameter give exact zeros; ``f(0) = 0`` maps, shape ops and pooling keep
them; ``mul`` keeps them if any coupled factor is zero, ``add`` if every term is. Everything else
(``sigmoid``, ``x + 3``, LayerNorm, unknown ops) is not provably zero, so ``shrink`` probes it.
``shrink`` only trusts this when every zeroed member really is zero.
"""

from __future__ import annotations

import numbers
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import rules_attention as ra
from . import rules_elementwise as re_
from . import rules_modules as rm
from . import rules_shape as rs
from .rules_base import RuleContext, is_label
from .rules_shape import varying_dim

ZERO_PRESERVING = {
    "relu",
    "relu_",
    "relu6",
    "gelu",
    "silu",
    "hardswish",
    "leaky_relu",
    "elu",
    "tanh",
    "dropout",
    "dropout1d",
    "dropout2d",
    "alpha_dropout",
    "stochastic_depth",
    "contiguous",
    "clone",
    "float",
    "half",
    "double",
    "to",
    "type_as",
    "detach",
    "neg",
    "abs",
    "square",
    "sqrt",
    "erf",
    "hardtanh",
    "mish",
}
ZERO_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Tanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Mish,
    nn.Hardtanh,
    nn.PReLU,
)
ADDS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub", "add_", "sub_"}
MULS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
DIVS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}


def _tensor_args(cx: RuleContext, node: fx.Node) -> list[fx.Node]:
    return [
        a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node) and is_label(cx.env.get(a))
    ]


def _all(zero: set[str], nodes) -> bool:
    nodes = list(nodes)
    return bool(nodes) and all(n.name in zero for n in nodes)


def _first(zero: set[str], cx: RuleContext, node: fx.Node) -> bool:
    args = _tensor_args(cx, node)
    return bool(args) and args[0].name in zero


def _unary(zero, cx, node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name in ZERO_PRESERVING and _first(zero, cx, node)


def _unary_module(zero, cx, node) -> bool:
    return isinstance(cx.module(node), ZERO_MODULES) and _first(zero, cx, node)


def _elementwise(zero, cx, node) -> bool:
    args = _tensor_args(cx, node)
    if node.target in MULS:
        coupled = [a for a in args if varying_dim(cx.env[a]) is not None] or args
        return any(a.name in zero for a in coupled)
    if node.target in ADDS:
        scalars = [a for a in node.args if isinstance(a, numbers.Number)]
        return all(s == 0 for s in scalars) and _all(zero, args)
    if node.target in DIVS:
        return bool(args) and node.args[0] is args[0] and args[0].name in zero
    return False


def _contraction(zero, cx, node) -> bool:
    varying = [a for a in _tensor_args(cx, node) if varying_dim(cx.env[a]) is not None]
    return _all(zero, varying)


def _batch_norm(zero, cx, node) -> bool:
    return bool(getattr(cx.module(node), "affine", False))  # gamma and beta are zeroed with the unit


ZERO_RULES: dict[Callable, Callable[[set, RuleContext, fx.Node], bool]] = {
    rm.conv: lambda z, cx, n: True,
    rm.linear: lambda z, cx, n: True,
    rm.embedding: lambda z, cx, n: True,
    rm.conv_transpose: lambda z, cx, n: True,
    rm.batch_norm: _batch_norm,
    re_.unary: _unary,
    re_.unary_module: _unary_module,
    re_.elementwise: _elementwise,
    ra.einsum: _contraction,
    ra.matmul: _contraction,
    ra.sdpa: lambda z, cx, n: len(n.args) > 2 and isinstance(n.args[2], fx.Node) and n.args[2].name in z,
    **{
        r: (lambda z, cx, n: _all(z, _tensor_args(cx, n)))
        for r in (
            rs.reshape,
            rs.expand,
            rs.permute,
            rs.transpose,
            rs.cat,
            rs.stack,
            rs.split,
            rs.unbind,
            rs.getitem,
            rs.reduce,
            rs.norm,
            rs.pool,
            rs.roll,
            rs.patch_merging_pad,
        )
    },
}


def _pad(zero: set[str], cx: RuleContext, node: fx.Node) -> bool:
    """``F.pad(x, p, mode, value)``: zero channels stay zero when padded with 0 (or by reflection/replication/
    circular copies of themselves); ``value=1.0`` puts non-zeros at the pruned channels."""
    mode, value = cx.inp(node, 2, "mode", "constant"), cx.inp(node, 3, "value", None)
    return (
        mode in ("constant", "reflect", "replicate", "circular")
        and (mode != "constant" or value is None or (isinstance(value, numbers.Number) and value == 0))
        and _first(zero, cx, node)
    )


ZERO_RULES[rs.pad] = _pad


def _cat_args(cx: RuleContext, node: fx.Node) -> list[fx.Node]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return [t for t in tensors if isinstance(t, fx.Node)]


def is_zero_after(zero: set[str], cx: RuleContext, node: fx.Node, rule: Callable | None) -> bool:
    """Whether ``node``'s output is exactly zero at every pruned position (conservative)."""
    if node.op == "get_attr":
        return True
    if rule in (rs.cat, rs.stack):
        return _all(zero, _cat_args(cx, node))
    if rule is rs.getitem and isinstance(node.args[0], fx.Node) and not is_label(cx.env.get(node.args[0])):
        return node.args[0].name in zero  # an item of a tuple output (split, chunk)
    fn = ZERO_RULES.get(rule)
    return bool(fn and fn(zero, cx, node))
