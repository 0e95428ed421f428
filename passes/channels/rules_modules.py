"""Rules for layers: conv/linear/embedding produce fresh channels and consume their input channels;
depthwise and grouped convs keep the group structure; norms are per channel (BatchNorm) or fix the
channels they normalize over (LayerNorm, RMSNorm, GroupNorm; LayerNorm and RMSNorm pass them, recorded as
approximations, under ``streams="approximate"``: ``streams.py``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .rewrites import REWRITES
from .rules_base import RuleContext, channel_rule, is_label, out_shape, shape_of
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


@channel_rule(
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
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


NO_AFFINE = "{} statistics span these channels and, without an affine weight, pruned channels are not zero"


def _arg(node: fx.Node, i: int, key: str):
    return node.args[i] if i < len(node.args) else node.kwargs.get(key)


def _normalized(lab: torch.Tensor, k: int) -> int | None:
    """The channel dim of ``lab`` if it is among the last ``k`` (normalised) dims, else ``None``."""
    d = varying_dim(lab)
    return d if d is not None and d >= lab.ndim - k else None


def norm_module(cx: RuleContext, node: fx.Node, kind: str):
    """``LayerNorm``/``RMSNorm`` over the last ``len(normalized_shape)`` dims: pruning a normalised channel
    changes the statistics, so a barrier; with ``streams="approximate"`` (``streams.py``) a recorded
    approximation whose affine parameters are zeroed and sliced with the channels."""
    lab, m = cx.inp(node), cx.module(node)
    k = len(m.normalized_shape)
    d = _normalized(lab, k)
    if d is None:
        return lab
    if cx.t.streams == "approximate" and getattr(m, "weight", None) is None:
        cx.t.barrier(node, NO_AFFINE.format(kind), lab)
    elif cx.t.approximate(node, f"{kind} statistics span these channels", lab):
        vec = cx.t.along(lab, d, out_shape(node)[d])
        add_member(cx, node, "weight", d - (lab.ndim - k), vec, "out")
        add_member(cx, node, "bias", d - (lab.ndim - k), vec, "out")
    return lab


@channel_rule(nn.LayerNorm)
def layer_norm(cx: RuleContext, node: fx.Node):
    """LayerNorm over the last dims: pruning a normalized channel changes mean/var (``norm_module``)."""
    return norm_module(cx, node, "LayerNorm")


@channel_rule(nn.RMSNorm)
def rms_norm(cx: RuleContext, node: fx.Node):
    """RMSNorm over the last dims: pruning a normalized channel changes the mean square (``norm_module``)."""
    return norm_module(cx, node, "RMSNorm")


def norm_fn(cx: RuleContext, node: fx.Node, kind: str, affine: tuple[str, ...]):
    """``F.layer_norm(x, shape, w, b)`` / ``F.rms_norm(x, shape, w)``: as ``norm_module``; the affine tensors
    (``get_attr`` reads) are united with the channels and ``normalized_shape`` is rewritten by shrink."""
    lab = cx.inp(node, 0, "input")
    shape = cx.inp(node, 1, "normalized_shape")
    static = isinstance(shape, (int, tuple, list, torch.Size))
    literal = static and not isinstance(_arg(node, 1, "normalized_shape"), fx.Node)  # shrink can rewrite it
    k = 1 if isinstance(shape, int) else len(shape) if static else lab.ndim
    d = _normalized(lab, k)  # (normalized shape unknown: every dim may be normalized)
    params = [(key, _arg(node, i, key)) for i, key in enumerate(affine, start=2)]
    labels = [cx.value(a) for _, a in params if a is not None]
    if d is None:
        cx.t.fix(labels)
        return lab
    if cx.t.streams == "approximate" and (not literal or params[0][1] is None):
        why = f"{kind} normalized_shape is not a constant shrink can rewrite" if not literal else NO_AFFINE.format(kind)
        cx.t.barrier(node, why, [lab, labels])
    elif cx.t.approximate(node, f"{kind} statistics span these channels", lab):
        vec, wd = cx.t.along(lab, d, out_shape(node)[d]), d - (lab.ndim - k)
        for key, a in params:
            pl = cx.value(a) if a is not None else None
            if pl is None:
                continue
            if (
                isinstance(a, fx.Node)
                and is_label(pl)
                and pl.ndim == k
                and shape_of(a)[wd] == vec.numel()
                and varying_dim(pl) in (wd, None)
            ):
                cx.t.union(vec, cx.t.along(pl, wd, vec.numel()))
            else:
                cx.t.barrier(node, f"its '{key}' is not a tensor the analysis can slice", [vec, pl])
        cx.t.rewrite_node(node, "normalized_shape", vec=vec.clone(), pos=wd)
        return lab
    cx.t.fix(labels)
    return lab


@channel_rule(F.layer_norm)
def layer_norm_fn(cx: RuleContext, node: fx.Node):
    return norm_fn(cx, node, "layer_norm", ("weight", "bias"))


@channel_rule(F.rms_norm)
def rms_norm_fn(cx: RuleContext, node: fx.Node):
    return norm_fn(cx, node, "rms_norm", ("weight",))


@REWRITES.register("normalized_shape")
def rewrite_normalized_shape(node: fx.Node, data: dict, kept) -> bool:
    """``F.layer_norm(x, shape, ...)`` normalising pruned channels: ``shape[pos]`` becomes the kept count."""
    new = int(np.count_nonzero(kept(data["vec"])))
    raw = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    sizes = [raw] if isinstance(raw, int) else list(raw)
    if sizes[data["pos"]] == new:
        return False
    sizes[data["pos"]] = new
    if len(node.args) > 1:
        node.args = (node.args[0], tuple(sizes), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": tuple(sizes)}
    return True


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
