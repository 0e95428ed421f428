"""Rules for layers: conv/linear/embedding produce fresh channels and consume their input channels;
depthwise and grouped convs keep the group structure; norms are per channel (BatchNorm) or fix the
channels they normalize over (LayerNorm, GroupNorm)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .rules_base import RuleContext, channel_rule, out_shape
from .rules_shape import varying_dim
from .tracker import Check, Constraint, Member


def add_member(cx: RuleContext, node: fx.Node, tensor: str, dim: int, atoms: torch.Tensor, role: str) -> None:
    owner = cx.module(node)
    if getattr(owner, tensor, None) is not None:
        cx.t.members.append(Member(node.target, tensor, dim, atoms, role, node.name))


def producer_out(cx: RuleContext, node: fx.Node, atoms: torch.Tensor) -> None:
    add_member(cx, node, "weight", 0, atoms, "out")
    add_member(cx, node, "bias", 0, atoms, "out")


def shared_out(cx: RuleContext, name: str, atoms: torch.Tensor) -> torch.Tensor:
    """Output atoms derived from the input (depthwise): unite with earlier calls of the same module."""
    prev = cx.t.module_atoms.get(name)
    if prev is None:
        cx.t.module_atoms[name] = atoms
        return atoms
    cx.t.union(prev, atoms)
    return prev


@channel_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(cx: RuleContext, node: fx.Node):
    """``conv(x)``: groups=1 consumes dim 1 and produces fresh channels; depthwise maps channel c to
    outputs ``c*m..c*m+m-1``; grouped with in == out couples in/out per index (equal count per group)."""
    m, name = cx.module(node), node.target
    nd = len(out_shape(node))
    vec = cx.t.along(cx.inp(node), 1, m.in_channels)
    cin, cout, g = m.in_channels, m.out_channels, m.groups
    if g == 1:
        add_member(cx, node, "weight", 1, vec, "in")
        cx.t.checks.append(Check(node.name, node.args[0].name, 1, vec, "fold", name))
        out = cx.t.producer_atoms(name, cout)
    elif g == cin and cout % cin == 0:
        out = shared_out(cx, name, vec.repeat_interleave(cout // cin))
    elif cin == cout:
        out = shared_out(cx, name, vec)
        cx.t.constraints.append(Constraint(out, g, node.name, droppable=True))
        cx.t.checks.append(Check(node.name, node.args[0].name, 1, vec, "zero", name))
    else:
        cx.t.barrier(node, f"grouped conv with in {cin} != out {cout}: input channels kept", vec)
        out = cx.t.producer_atoms(name, cout)
        cx.t.constraints.append(Constraint(out, g, node.name))
    producer_out(cx, node, out)
    return cx.t.place(out, 1, nd)


@channel_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(cx: RuleContext, node: fx.Node):
    m, name = cx.module(node), node.target
    nd = len(out_shape(node))
    vec = cx.t.along(cx.inp(node), 1, m.in_channels)
    if m.groups != 1:
        cx.t.barrier(node, "grouped transposed conv", vec)
        return cx.fixed(node)
    add_member(cx, node, "weight", 0, vec, "in")
    cx.t.checks.append(Check(node.name, node.args[0].name, 1, vec, "zero", name))
    out = cx.t.producer_atoms(name, m.out_channels)
    add_member(cx, node, "weight", 1, out, "out")
    add_member(cx, node, "bias", 0, out, "out")
    return cx.t.place(out, 1, nd)


@channel_rule(nn.Linear)
def linear(cx: RuleContext, node: fx.Node):
    """``linear(x)`` over the last dim: consumes it, produces ``out_features`` fresh channels."""
    m, name = cx.module(node), node.target
    nd = len(out_shape(node))
    vec = cx.t.along(cx.inp(node), -1, m.in_features)
    add_member(cx, node, "weight", 1, vec, "in")
    cx.t.checks.append(Check(node.name, node.args[0].name, nd - 1, vec, "fold", name))
    out = cx.t.producer_atoms(name, m.out_features)
    producer_out(cx, node, out)
    return cx.t.place(out, -1, nd)


HF_CONV1D = "module:transformers.pytorch_utils.Conv1D"  # by name: transformers is never imported here


@channel_rule(HF_CONV1D)
def hf_conv1d(cx: RuleContext, node: fx.Node):
    """transformers' ``Conv1D`` (GPT-2): ``x @ weight + bias`` with ``weight`` of shape ``(in, out)``, so a
    ``Linear`` whose weight is transposed: dim 0 consumes the input's last dim, dim 1 produces ``nf`` channels."""
    m, name = cx.module(node), node.target
    nd = len(out_shape(node))
    vec = cx.t.along(cx.inp(node), -1, m.weight.shape[0])
    add_member(cx, node, "weight", 0, vec, "in")
    cx.t.checks.append(Check(node.name, node.args[0].name, nd - 1, vec, "fold", name))
    out = cx.t.producer_atoms(name, m.weight.shape[1])
    add_member(cx, node, "weight", 1, out, "out")
    add_member(cx, node, "bias", 0, out, "out")
    return cx.t.place(out, -1, nd)


@channel_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
              nn.InstanceNorm2d, nn.InstanceNorm3d)
def batch_norm(cx: RuleContext, node: fx.Node):
    """Per-channel normalization on dim 1: affine params are zeroed/sliced, running stats sliced."""
    m = cx.module(node)
    nd = len(out_shape(node))
    vec = cx.t.along(cx.inp(node), 1, m.num_features)
    add_member(cx, node, "weight", 0, vec, "out")
    add_member(cx, node, "bias", 0, vec, "out")
    add_member(cx, node, "running_mean", 0, vec, "aux")
    add_member(cx, node, "running_var", 0, vec, "aux")
    return cx.t.place(vec, 1, nd)


@channel_rule(nn.LayerNorm)
def layer_norm(cx: RuleContext, node: fx.Node):
    """LayerNorm over the last dims: pruning a normalized channel changes mean/var, so those are fixed."""
    lab = cx.inp(node)
    k = len(cx.module(node).normalized_shape)
    d = varying_dim(lab)
    if d is not None and d >= lab.ndim - k:
        cx.t.barrier(node, "LayerNorm statistics span these channels (pruning is not exact)", lab)
    return lab


@channel_rule(F.layer_norm)
def layer_norm_fn(cx: RuleContext, node: fx.Node):
    lab = cx.inp(node, 0, "input")
    shape = cx.inp(node, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape) if isinstance(shape, (tuple, list, torch.Size)) else lab.ndim
    d = varying_dim(lab)
    if d is not None and d >= lab.ndim - k:  # (normalized shape unknown: every dim may be normalized)
        cx.t.barrier(node, "layer_norm statistics span these channels (pruning is not exact)", lab)
    cx.t.fix([cx.inp(node, 2, "weight"), cx.inp(node, 3, "bias")])
    return lab


@channel_rule(nn.GroupNorm, F.group_norm)
def group_norm(cx: RuleContext, node: fx.Node):
    lab = cx.inp(node, 0, "input")
    if varying_dim(lab) == 1:
        cx.t.barrier(node, "GroupNorm statistics span the channels of a group", lab)
    return lab


@channel_rule(nn.Embedding)
def embedding(cx: RuleContext, node: fx.Node):
    """``embedding(idx)``: produces ``embedding_dim`` fresh channels (weight dim 1)."""
    m = cx.module(node)
    cx.t.fix(cx.inp(node))
    out = cx.t.producer_atoms(node.target, m.embedding_dim)
    add_member(cx, node, "weight", 1, out, "out")
    return cx.t.place(out, -1, len(out_shape(node)))
