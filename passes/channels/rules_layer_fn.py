"""Rules for functional convs ``F.conv1d/2d/3d(x, w, b, stride, padding, dilation, groups)`` and ``F.linear(x, w, b)``.

Output channels are the rows of ``w`` (dim 0). A weight read straight from a module (``get_attr``, read by
no other kind of op) is sliced like the module's: rows with the output, columns (dim 1) with the input. A
weight *computed* from a parameter keeps the rows it carries in its labels (weight standardisation, timm's
``StdConv2d``/``ScaledStdConv2d``: ``batch_norm(w.reshape(1, out, -1)).reshape_as(w)`` normalises each row,
so pruning rows is exact) but not its columns: the standardisation statistics span the input channels, so
removing one changes every kept weight of the row; those input channels are a barrier. The same holds for
the timm standardised convs kept as opaque leaves (``*Same`` variants). Depthwise convs follow their input
channels and get their ``groups`` argument renumbered by shrink; other grouped convs prune output channels
evenly per group and keep their input channels whole. ``F.linear`` (timm's ``Linear`` subclasses trace into
it) is a conv with groups 1 whose input channels are the last dim.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.meta_keys import NN_MODULE_STACK

from .rewrites import REWRITES
from .rules_base import RuleContext, channel_rule, out_shape, param_channel_dim, shape_of
from .rules_modules import add_member, producer_out, shared_out
from .rules_norm_fn import arg_node
from .rules_shape import varying_dim
from .tracker import Check, Constraint, Member
from .zeros import ZERO_RULES

CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)
LAYER_FNS = (*CONV_FNS, F.linear)
STANDARDIZED = "standardised weight: its statistics span the input channels, so they are kept whole"
COMPUTED = "weight computed from a parameter by ops that do not keep its input channels: they are kept whole"
SHARED = "weight parameter also read by other ops: its input channels are kept whole"
WS_CONV_MODULES = tuple(
    f"module:timm.layers.std_conv.{n}" for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
)

param_channel_dim(0, "weight", nn.Conv1d, nn.Conv2d, nn.Conv3d)  # a conv kernel read as a tensor: its rows


def _space(node: fx.Node, param) -> str:
    """The producer's name for the layer selection: the module holding the weight, else the module whose
    forward made the call, else the node."""
    if param is not None:
        return param[0]
    stack = list((node.meta.get(NN_MODULE_STACK) or {}).values())
    return stack[-1][0] if stack and isinstance(stack[-1], tuple) else node.name


def _producer(cx: RuleContext, node: fx.Node, w, param, cout: int) -> torch.Tensor:
    """Output atoms of a functional layer, registered under its module (``module_atoms``: the layer selection
    prunes them) unless that module already produces through another weight."""
    space = _space(node, param)
    ident = w.target if param is not None else w.name
    claim = cx.t.fn_producers.get(space)
    if claim is None and space not in cx.t.module_atoms:
        cx.t.fn_producers[space] = ident
        return cx.t.producer_atoms(space, cout)
    if claim == ident and cx.t.module_atoms[space].numel() == cout:
        return cx.t.module_atoms[space]
    return cx.t.fresh(cout, space)


def _direct_param(cx: RuleContext, w) -> tuple[str, str] | None:
    """``(owner, attr)`` if ``w`` is a ``get_attr`` read only as the weight of functional layers (which slice
    both its dims); marks the read whole."""
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    for user in w.users:
        if user.op != "call_function" or user.target not in LAYER_FNS or arg_node(user, 1, "weight") is not w:
            return None
    cx.t.whole_reads.add(w.name)
    owner, _, attr = w.target.rpartition(".")
    return owner, attr


def _rows(cx: RuleContext, node: fx.Node, w, out: torch.Tensor, param) -> None:
    """Couple the weight's rows with the output channels ``out`` (or keep both whole)."""
    lab = cx.value(w)
    if varying_dim(lab) == 0 and lab.shape[0] == out.numel():
        cx.t.union(out, lab.reshape(-1))
    elif param is not None:
        cx.t.members.append(Member(*param, 0, out, "out", node.name))
    elif out.numel() > 1:
        cx.t.barrier(node, "weight rows the analysis cannot slice: output channels kept", [out, lab])


def _bias(cx: RuleContext, node: fx.Node, out: torch.Tensor) -> None:
    b = arg_node(node, 2, "bias")
    if isinstance(b, fx.Node):
        lab = cx.value(b)
        if varying_dim(lab) == 0 or out.numel() == 1:
            cx.t.union(out, lab.reshape(-1))
        else:
            cx.t.barrier(node, "bias the analysis cannot slice: output channels kept", [out, lab])


def _columns(cx: RuleContext, node: fx.Node, vec: torch.Tensor, param, cdim: int) -> None:
    """The weight's dim 1 consumes the input channels ``vec`` (zero at pruned ones, checked by shrink)."""
    if param is None:
        w = arg_node(node, 1, "weight")
        read = isinstance(w, fx.Node) and w.op == "get_attr"
        cx.t.barrier(node, SHARED if read else STANDARDIZED if _standardized(w) else COMPUTED, vec)
        return
    cx.t.members.append(Member(*param, 1, vec, "in", node.name))
    cx.t.checks.append(Check(node.name, arg_node(node, 0, "input").name, cdim, vec, "zero"))


def _standardized(w, limit: int = 32) -> bool:
    """Whether weight ``w`` is normalised (a ``batch_norm``/``layer_norm``/... among the last ``limit`` ops
    that compute it)."""
    stack, seen = [w], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in (F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm):
            return True
        stack.extend(a for a in n.all_input_nodes)
    return False


@channel_rule(*CONV_FNS)
def conv_fn(cx: RuleContext, node: fx.Node):
    """``F.conv2d(x, w, b, stride, padding, dilation, groups)``: like ``nn.Conv2d`` with ``w``'s rows as outputs."""
    x, w = arg_node(node, 0, "input"), arg_node(node, 1, "weight")
    if shape_of(x) is None or shape_of(w) is None:
        cx.t.barrier(node, "conv operands of unknown shape", [cx.value(x), cx.value(w)])
        return cx.fixed(node)
    cdim = 1 if len(shape_of(x)) == len(shape_of(w)) else 0  # an unbatched input has its channels first
    cin, cout, nd = shape_of(x)[cdim], shape_of(w)[0], len(out_shape(node))
    g = cx.inp(node, 6, "groups", 1)
    vec = cx.t.along(cx.value(x), cdim, cin)
    param = _direct_param(cx, w)
    if not isinstance(g, int):
        cx.t.barrier(node, "conv groups not known statically", [vec, cx.value(w)])
        return cx.fixed(node)
    if g == 1:
        out = _producer(cx, node, w, param, cout)
        _columns(cx, node, vec, param, cdim)
    elif g == cin and cout % cin == 0:
        out = vec.repeat_interleave(cout // cin)
        cx.t.rewrite_node(node, "conv_groups", vec=vec.clone(), old=g)
    else:
        out = _producer(cx, node, w, param, cout)
        cx.t.constraints.append(Constraint(out, g, node.name))
        if cin == cout:  # the conv slicer would regroup the input channels with the rows: keep both
            cx.t.barrier(node, f"grouped conv ({g} groups, in == out) read functionally: channels kept", [vec, out])
        else:
            cx.t.barrier(node, f"grouped conv ({g} groups) read functionally: input channels kept", vec)
    _rows(cx, node, w, out, param)
    _bias(cx, node, out)
    return cx.t.place(out, cdim, nd)


@channel_rule(F.linear)
def linear_fn(cx: RuleContext, node: fx.Node):
    """``F.linear(x, w, b)``: like ``nn.Linear``, ``w``'s rows are the outputs, its columns ``x``'s last dim."""
    x, w = arg_node(node, 0, "input"), arg_node(node, 1, "weight")
    if shape_of(x) is None or shape_of(w) is None or len(shape_of(w)) != 2 or out_shape(node) is None:
        cx.t.barrier(node, "linear operands of unknown shape", [cx.value(x), cx.value(w)])
        return cx.fixed(node)
    cdim = len(shape_of(x)) - 1
    vec = cx.t.along(cx.value(x), cdim, shape_of(x)[cdim])
    param = _direct_param(cx, w)
    out = _producer(cx, node, w, param, shape_of(w)[0])
    _columns(cx, node, vec, param, cdim)
    _rows(cx, node, w, out, param)
    _bias(cx, node, out)
    return cx.t.place(out, cdim, len(out_shape(node)))


@channel_rule(*WS_CONV_MODULES)
def standardized_conv(cx: RuleContext, node: fx.Node):
    """An opaque timm standardised conv: output channels as ``nn.Conv2d`` (rows, bias, ``gain``), input
    channels kept whole (depthwise: per-row statistics over the kernel only, pruned like ``nn.Conv2d``)."""
    m, name = cx.module(node), node.target
    cin, cout, g = m.in_channels, m.out_channels, m.groups
    vec = cx.t.along(cx.inp(node), 1, cin)
    if g == cin and cout % cin == 0:
        out = shared_out(cx, name, vec.repeat_interleave(cout // cin))
    else:
        out = cx.t.producer_atoms(name, cout)
        if g > 1:
            cx.t.constraints.append(Constraint(out, g, node.name))
        regroup = 1 < g and cin == cout  # the conv slicer would regroup the input channels with the rows
        cx.t.barrier(
            node,
            STANDARDIZED + (" (grouped, in == out: output channels too)" if regroup else ""),
            [vec, out] if regroup else vec,
        )
    producer_out(cx, node, out)
    add_member(cx, node, "gain", 0, out, "out")
    return cx.t.place(out, 1, len(out_shape(node)))


@REWRITES.register("conv_groups")
def rewrite_conv_groups(node: fx.Node, data: dict, kept) -> bool:
    """A depthwise ``F.conv*``: ``groups`` becomes the number of kept input channels."""
    new = int(np.count_nonzero(kept(data["vec"])))
    if new == data["old"]:
        return False
    if len(node.args) > 6:
        node.args = (*node.args[:6], new, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new}
    return True


def _zero_layer(zero: set[str], cx: RuleContext, node: fx.Node) -> bool:
    """Zero at pruned outputs when the weight rows (and the bias, if any) are."""
    w, b = arg_node(node, 1, "weight"), arg_node(node, 2, "bias")
    return isinstance(w, fx.Node) and w.name in zero and (b is None or (isinstance(b, fx.Node) and b.name in zero))


ZERO_RULES[conv_fn] = ZERO_RULES[linear_fn] = _zero_layer
ZERO_RULES[standardized_conv] = lambda z, cx, n: True  # zeroed rows standardise to zero rows
