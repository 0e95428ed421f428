"""Rules for per-channel functional ops (what tracing into timm's ``BatchNormAct2d`` and friends gives):
``F.batch_norm`` / ``F.instance_norm`` / ``F.prelu`` act on dim 1 channel by channel, so their 1-D
statistics and affine tensors are coupled to it. Such a tensor read from a module (``get_attr``) is then
sliced with the channels like the module's own (running stats ``aux``: sliced only; affine ``out``: zeroed
and sliced); one the analysis cannot slice (a model input, a computed constant) keeps the channels whole."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .rules_base import RuleContext, channel_rule, out_shape, shape_of
from .rules_shape import varying_dim
from .zeros import ZERO_RULES

# (position, keyword, role) of the per-channel tensor arguments of each op
BATCH_NORM_ARGS = ((1, "running_mean", "aux"), (2, "running_var", "aux"), (3, "weight", "out"), (4, "bias", "out"))
PRELU_ARGS = ((1, "weight", "aux"),)


def arg_node(node: fx.Node, i: int, key: str) -> Any:
    return node.args[i] if i < len(node.args) else node.kwargs.get(key)


def couple_channel_tensors(cx: RuleContext, node: fx.Node, vec: torch.Tensor, spec) -> None:
    """Unite ``vec`` (the channels of dim 1) with dim 0 of every per-channel tensor argument in ``spec``."""
    for i, key, role in spec:
        a = arg_node(node, i, key)
        if not isinstance(a, fx.Node) or shape_of(a) is None:
            continue
        lab, n = cx.value(a), (shape_of(a) or (1,))[0]
        if len(shape_of(a)) == 1 and n == vec.numel() and (n == 1 or varying_dim(lab) == 0):
            cx.t.union(vec, lab.reshape(-1))
            if a.op == "get_attr":
                cx.t.set_role(a.name, role)
        elif n > 1 or len(shape_of(a)) != 1:
            cx.t.barrier(node, f"its per-channel '{key}' is not a tensor the analysis can slice", [vec, lab])


@channel_rule(F.batch_norm, F.instance_norm)
def batch_norm_fn(cx: RuleContext, node: fx.Node):
    """``F.batch_norm(x, mean, var, w, b)`` (also ``instance_norm``): per channel on dim 1, like the modules."""
    lab, shape = cx.inp(node, 0, "input"), out_shape(node)
    vec = cx.t.along(lab, 1, shape[1])
    couple_channel_tensors(cx, node, vec, BATCH_NORM_ARGS)
    return cx.t.place(vec, 1, len(shape))


@channel_rule(F.prelu, torch.prelu)
def prelu_fn(cx: RuleContext, node: fx.Node):
    """``F.prelu(x, w)``: ``w`` has one slope per channel of dim 1 (or one for all)."""
    lab, shape = cx.inp(node, 0, "input"), out_shape(node)
    if len(shape) < 2:
        return lab
    vec = cx.t.along(lab, 1, shape[1])
    couple_channel_tensors(cx, node, vec, PRELU_ARGS)
    return cx.t.place(vec, 1, len(shape))


def _zero_batch_norm(zero: set[str], cx: RuleContext, node: fx.Node) -> bool:
    """Zero at pruned channels when the (zeroed) affine weight is, or when batch statistics of a zero input are
    used; the bias, if any, must be zero too (running statistics are never zeroed)."""

    def is_zero(i: int, key: str) -> bool:
        a = arg_node(node, i, key)
        return isinstance(a, fx.Node) and a.name in zero

    bias_ok = arg_node(node, 4, "bias") is None or is_zero(4, "bias")
    batch_stats = node.target is F.instance_norm or bool(arg_node(node, 5, "training"))
    return bias_ok and (is_zero(3, "weight") or (batch_stats and is_zero(0, "input")))


ZERO_RULES[batch_norm_fn] = _zero_batch_norm
ZERO_RULES[prelu_fn] = lambda z, cx, n: isinstance(n.args[0], fx.Node) and n.args[0].name in z
