"""Rules for elementwise ops: unary maps keep labels; n-ary ops unite aligned channels (broadcast-aware)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .rules_base import RuleContext, channel_rule, is_label, out_shape, shape_of
from .tracker import FIXED

try:  # torchvision is optional at runtime
    from torchvision.ops import stochastic_depth as _tv_sd

    _STOCHASTIC_DEPTH = (_tv_sd,)
except ImportError:  # pragma: no cover
    _STOCHASTIC_DEPTH = ()

UNARY_FUNCTIONS = (
    F.relu,
    F.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.leaky_relu,
    F.leaky_relu_,
    F.elu,
    F.elu_,
    F.selu,
    F.celu,
    F.rrelu,
    F.hardtanh,
    F.hardtanh_,
    F.threshold,
    F.mish,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    F.tanhshrink,
    F.hardshrink,
    F.softshrink,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.sigmoid_,
    torch.tanh,
    torch.tanh_,
    torch.selu,
    torch.celu,
    torch.clamp,
    torch.clamp_min,
    torch.clamp_max,
    torch.clip,
    torch.exp,
    torch.expm1,
    torch.log,
    torch.log1p,
    torch.neg,
    torch.abs,
    torch.square,
    torch.sqrt,
    torch.rsqrt,
    torch.reciprocal,
    torch.erf,
    torch.sign,
    torch.sin,
    torch.cos,
    torch.nan_to_num,
    torch.pow,
    operator.pow,
    operator.neg,
    operator.abs,
    *_STOCHASTIC_DEPTH,
)
UNARY_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "clamp_max",
    "clamp_max_",
    "clip",
    "clip_",
    "contiguous",
    "clone",
    "float",
    "half",
    "double",
    "bfloat16",
    "to",
    "type_as",
    "detach",
    "exp",
    "exp_",
    "expm1",
    "log",
    "log1p",
    "neg",
    "neg_",
    "abs",
    "abs_",
    "sqrt",
    "sqrt_",
    "rsqrt",
    "square",
    "reciprocal",
    "erf",
    "sign",
    "sin",
    "cos",
    "nan_to_num",
    "pow",
    "pow_",
    "hardswish",
    "silu",
    "gelu",
)
UNARY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.PReLU,
)
BINARY = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    operator.isub,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.lerp,
)
BINARY_METHODS = ("add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_", "maximum", "minimum")


@channel_rule(*UNARY_FUNCTIONS, *(f"method:{m}" for m in UNARY_METHODS))
def unary(cx: RuleContext, node: fx.Node):
    """``f(x)``: the output carries the input's channels unchanged (extra tensor args unite like add)."""
    if sum(isinstance(a, fx.Node) and shape_of(a) is not None for a in node.args) > 1:
        return elementwise(cx, node)
    return cx.inp(node, 0, "input")


@channel_rule(*UNARY_MODULES)
def unary_module(cx: RuleContext, node: fx.Node):
    """``nn.ReLU()(x)`` and friends: identity on labels (PReLU's per-channel weight is not sliced: fixed)."""
    lab = cx.inp(node)
    if isinstance(cx.module(node), nn.PReLU) and cx.module(node).weight.numel() > 1:
        cx.t.barrier(node, "PReLU with per-channel weight", lab)
    return lab


@channel_rule(*BINARY, *(f"method:{m}" for m in BINARY_METHODS))
def elementwise(cx: RuleContext, node: fx.Node):
    """``a (+|*|-|/) b``: channels at the same (broadcast) position are united."""
    operands = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node) and is_label(cx.env.get(a)) and shape_of(a) is not None:
            operands.append((cx.env[a], shape_of(a)))
    shape = out_shape(node)
    if not operands or shape is None:
        return cx.fixed(node)
    return merge(cx, operands, shape)


def merge(cx: RuleContext, operands, shape) -> torch.Tensor:
    """Unite labels of operands aligned by broadcasting to ``shape``; an operand broadcast along a
    varying (channel) dim is not sliced with it, so its own atoms are fixed."""
    nd = len(shape)
    padded = []
    for lab, shp in operands:
        pad = nd - lab.ndim
        padded.append((lab.reshape((1,) * pad + tuple(lab.shape)), (1,) * pad + tuple(shp)))
    vary = {d for lab, _ in padded for d in range(nd) if lab.shape[d] > 1}
    part = []
    for lab, shp in padded:
        if any(shp[d] == 1 and shape[d] > 1 for d in vary):
            cx.t.fix(lab)
        else:
            part.append(lab)
    if not part:
        return torch.full((1,) * nd, FIXED, dtype=torch.long)
    common = torch.broadcast_shapes(*(p.shape for p in part))
    out = part[0].expand(common)
    for other in part[1:]:
        cx.t.union(out, other)
    return cx.t.normalize(out.clone())


@channel_rule(
    F.softmax,
    F.log_softmax,
    F.softmin,
    torch.softmax,
    torch.log_softmax,
    "method:softmax",
    "method:log_softmax",
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
)
def softmax(cx: RuleContext, node: fx.Node):
    """Normalizes along ``dim``: channels varying along it are fixed (pruning would change the sum)."""
    lab = cx.inp(node, 0, "input")
    dim = cx.module(node).dim if node.op == "call_module" else cx.inp(node, 1, "dim")
    if not isinstance(dim, int) or lab.shape[dim % lab.ndim] > 1:
        cx.t.barrier(node, "normalizes across channels", lab)
    return lab
