"""Rules for ops shaped by another tensor and for index selection.

Padding modules (``nn.ConstantPad2d``, ``nn.ZeroPad2d``, ``nn.ReflectionPad2d``, ...) are ``F.pad``.
``x.reshape_as(y)`` / ``x.view_as(y)`` / ``x.expand_as(y)`` take ``y``'s runtime shape, so after shrinking
``x`` and ``y`` must lose the same channels: their labels are united (a reshape to another layout maps
``x``'s labels in row-major order first); channels that cannot line up are a barrier. ``index_select`` on a
non-channel dim keeps the channels; on the channel dim it is a barrier (shrink cannot renumber the index).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .rules_base import RuleContext, channel_rule, is_label, out_shape, shape_of
from .rules_elementwise import merge
from .rules_shape import pad_labels, reshape_labels, varying_dim
from .zeros import ZERO_RULES


def _first_zero(zero: set[str], cx: RuleContext, node: fx.Node) -> bool:
    return isinstance(node.args[0], fx.Node) and node.args[0].name in zero


@channel_rule("method:reshape_as", "method:view_as")
def reshape_as(cx: RuleContext, node: fx.Node):
    """``x.reshape_as(y)``: ``x``'s labels laid out in ``y``'s shape, united with ``y``'s."""
    lab, other = cx.inp(node, 0), node.args[1]
    olab, shape = cx.value(other), out_shape(node)
    if not is_label(olab):
        cx.t.barrier(node, "reshape to the shape of a tensor the analysis does not follow", lab)
        return cx.fixed(node)
    out = lab if cx.inshape(node, 0) == shape else reshape_labels(cx, lab, cx.inshape(node, 0), shape)
    d, e = varying_dim(out), varying_dim(olab)
    if d is None and e is None:
        return out
    if d != e:
        cx.t.barrier(node, "reshaped to a tensor whose channels do not line up with the input's", [out, olab])
        return cx.fixed(node)
    cx.t.union(out, olab)
    return out


@channel_rule("method:expand_as")
def expand_as(cx: RuleContext, node: fx.Node):
    """``x.expand_as(y)``: broadcast like ``x + 0 * y`` (aligned channels united)."""
    x, other = node.args[0], node.args[1]
    if not is_label(cx.value(other)):
        cx.t.barrier(node, "expanded to the shape of a tensor the analysis does not follow", cx.value(x))
        return cx.fixed(node)
    return merge(cx, [(cx.value(x), shape_of(x)), (cx.value(other), shape_of(other))], out_shape(node))


@channel_rule(
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
    torch.rand_like,
    torch.randn_like,
    "method:new_zeros",
    "method:new_ones",
)
def like(cx: RuleContext, node: fx.Node):
    """``torch.ones_like(x)``: a new tensor shaped like ``x``, so sliced with its channels; ``x.new_zeros(size)``
    has a constant size of its own (kept whole, ``x`` unconstrained)."""
    return cx.fixed(node) if node.op == "call_method" else cx.inp(node, 0, "input")


@channel_rule(torch.index_select, "method:index_select")
def index_select(cx: RuleContext, node: fx.Node):
    """``index_select(x, dim, idx)``: the channels pass when ``dim`` is not their dim."""
    lab, dim = cx.inp(node, 0, "input"), cx.inp(node, 1, "dim")
    cx.t.fix(cx.inp(node, 2, "index"))
    if not isinstance(dim, int) or dim % lab.ndim == varying_dim(lab):
        cx.t.barrier(node, "selects channels by index (shrink cannot renumber the index)", lab)
        return cx.fixed(node)
    return lab


PAD_MODULES = (
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.modules.padding._CircularPadNd,
)


@channel_rule(*PAD_MODULES)
def pad_module(cx: RuleContext, node: fx.Node):
    """``nn.ZeroPad2d(p)(x)`` and friends: ``F.pad(x, p)`` (a barrier only if the channel dim is padded)."""
    return pad_labels(cx, node, cx.inp(node), cx.module(node).padding)


def _zero_pad(zero: set[str], cx: RuleContext, node: fx.Node) -> bool:
    """A zero channel stays zero when padded with zeros, by reflection or by replication."""
    return _first_zero(zero, cx, node) and getattr(cx.module(node), "value", 0) == 0


ZERO_RULES[pad_module] = _zero_pad
ZERO_RULES[like] = lambda z, cx, n: n.target is torch.zeros_like
ZERO_RULES[reshape_as] = ZERO_RULES[expand_as] = ZERO_RULES[index_select] = _first_zero
