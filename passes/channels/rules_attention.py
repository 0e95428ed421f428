"""Rules for attention: einsum/matmul contractions (within-head dims of q and k are united, v's head
dims flow to the output; ``sdpa`` keeps its default scale when shrunk; with whole heads, ``heads.py``, the head
dim is a batch dim of the contraction and q/k/v/mask heads are united), ``F.normalize`` (cosine attention),
``nn.MultiheadAttention`` and torchvision's fused Swin attention function (both barriers where not decomposed)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .rewrites import REWRITES
from .rules_base import RuleContext, channel_rule, shape_of
from .rules_shape import varying_dim
from .tracker import FIXED, Check

try:
    from torchvision.models import swin_transformer as _swin

    _SWIN_FUSED = (_swin.shifted_window_attention,)
    _SWIN_BIAS = tuple(getattr(_swin, n) for n in ("_get_relative_position_bias",) if hasattr(_swin, n))
except ImportError:  # pragma: no cover
    _SWIN_FUSED, _SWIN_BIAS = (), ()


def contract(cx: RuleContext, node: fx.Node, srcs, subs: list[str], rhs: str) -> torch.Tensor:
    """Einsum semantics on labels: a letter's channels are united across operands; a letter summed
    away must be varying in every operand that has it (pruned positions are zero in all of them)."""
    labs = [cx.value(s) for s in srcs]
    shapes = [shape_of(s) for s in srcs]
    vecs: dict[str, torch.Tensor] = {}
    for lab, sub in zip(labs, subs):
        v = varying_dim(lab)
        if v is None:
            continue
        letter, vec = sub[v], lab.reshape(-1)
        if letter in vecs:
            cx.t.union(vecs[letter], vec)
        else:
            vecs[letter] = vec
    for letter in list(vecs):
        holders = [(lab, shp, sub, src) for lab, shp, sub, src in zip(labs, shapes, subs, srcs) if letter in sub]
        blocked = any(
            shp[sub.index(letter)] > 1 and (varying_dim(lab) is None or sub[varying_dim(lab)] != letter)
            for lab, shp, sub, _ in holders
        )
        if blocked or (letter not in rhs and len(holders) < 2):
            cx.t.fix(vecs.pop(letter))
        elif letter not in rhs:
            for _, _, sub, src in holders:
                cx.t.checks.append(Check(node.name, src.name, sub.index(letter), vecs[letter], "zero"))
    out_letters = [c for c in rhs if c in vecs]
    for c in out_letters[:-1]:
        cx.t.fix(vecs[c])
    if not out_letters:
        return torch.full((1,) * len(rhs), FIXED, dtype=torch.long)
    return cx.t.place(vecs[out_letters[-1]], rhs.index(out_letters[-1]), len(rhs))


@channel_rule(torch.einsum, torch.functional.einsum)
def einsum(cx: RuleContext, node: fx.Node):
    eq = node.args[0].replace(" ", "")
    srcs = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if "..." in eq or "->" not in eq or not all(isinstance(s, fx.Node) for s in srcs):
        cx.t.barrier(node, "einsum without explicit output subscripts", [cx.value(s) for s in srcs])
        return cx.fixed(node)
    lhs, rhs = eq.split("->")
    return contract(cx, node, list(srcs), lhs.split(","), rhs)


@channel_rule(operator.matmul, torch.matmul, torch.bmm, "method:matmul", "method:bmm")
def matmul(cx: RuleContext, node: fx.Node):
    """``a @ b`` as ``...ij,...jk->...ik`` (batch dims right-aligned)."""
    a, b = node.args[0], node.args[1]
    sa, sb = shape_of(a), shape_of(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        cx.t.barrier(node, "matmul with a vector operand", [cx.value(a), cx.value(b)])
        return cx.fixed(node)
    nb = max(len(sa), len(sb)) - 2
    batch = "abcdefgh"[:nb]
    sub_a = batch[nb - (len(sa) - 2) :] + "ij"
    sub_b = batch[nb - (len(sb) - 2) :] + "jk"
    return contract(cx, node, [a, b], [sub_a, sub_b], batch + "ik")


@channel_rule(F.scaled_dot_product_attention)
def sdpa(cx: RuleContext, node: fx.Node):
    """``sdpa(q, k, v)``: q/k head dims united by the contraction, v's head dims are the output's. Without an
    explicit ``scale`` (timm's ``Attention``) the default ``1/sqrt(q.size(-1))`` would change when shrinking:
    shrink passes the original one (``sdpa_scale``). ``attn_mask`` is added to the scores, whose heads and tokens
    are not channels here: its channels (T5's per-head position bias, an ``Embedding`` of ``n_heads``) are fixed."""
    srcs = [node.args[i] if i < len(node.args) else node.kwargs.get(n) for i, n in enumerate(("query", "key", "value"))]
    labs = [cx.value(s) for s in srcs]
    mask = cx.inp(node, 3, "attn_mask")
    if any(shape_of(s) is None or len(shape_of(s)) != 4 for s in srcs):
        cx.t.barrier(node, "scaled_dot_product_attention on operands that are not (batch, heads, tokens, dim)", labs)
        return cx.fixed(node)
    if any(varying_dim(lab) == 1 for lab in labs):
        return _sdpa_heads(cx, node, srcs, labs, mask)
    if isinstance(mask, torch.Tensor):  # (T5's head bias from an Embedding): broadcast over heads/tokens, kept whole
        cx.t.fix(mask)
    if cx.inp(node, 6, "scale") is None and varying_dim(labs[0]) == 3:
        cx.t.rewrite_node(node, "sdpa_scale", vec=labs[0].reshape(-1).clone(), scale=shape_of(srcs[0])[3] ** -0.5)
    contract(cx, node, srcs[:2], ["bhld", "bhsd"], "bhls")
    if varying_dim(labs[2]) not in (None, 3):
        cx.t.barrier(node, "value channels not on the last dim", labs[2])
        return cx.fixed(node)
    return labs[2]


def _sdpa_heads(cx: RuleContext, node: fx.Node, srcs, labs, mask):
    """Whole heads (``heads.py``): q, k, v and a per-head ``attn_mask`` vary along dim 1 and are united head by
    head; a key/value head shared by several query heads (``enable_gqa``) is united with all of them. Labels that
    vary along another dim (or an operand held whole) fix the heads."""
    n = shape_of(srcs[0])[1]
    heads = []
    for lab, shp in [(lab, shape_of(s)) for lab, s in zip(labs, srcs)] + [(mask, _mask_shape(node))]:
        if not isinstance(lab, torch.Tensor) or shp is None:
            continue
        d = varying_dim(lab)
        if d is None and (len(shp) < 3 or shp[-3] == 1):  # broadcast over heads, no channels: left alone
            continue
        if d is None or d != len(shp) - 3 or n % shp[d]:
            cx.t.barrier(node, "attention operands with channels on different dims", [*labs, mask])
            return cx.fixed(node)
        heads.append(lab.reshape(-1).repeat_interleave(n // shp[d]))
    for vec in heads[1:]:
        cx.t.union(heads[0], vec)
    return cx.t.place(heads[0].clone(), 1, 4)


def _mask_shape(node: fx.Node):
    return shape_of(node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask"))


@REWRITES.register("sdpa_scale")
def rewrite_sdpa_scale(node: fx.Node, data: dict, kept) -> bool:
    """An ``sdpa`` whose query dim shrank keeps its default scale ``1/sqrt(original dim)`` explicitly."""
    if kept(data["vec"]).all():
        return False
    if len(node.args) > 6:
        node.args = (*node.args[:6], data["scale"], *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "scale": data["scale"]}
    return True


@channel_rule(F.normalize)
def normalize(cx: RuleContext, node: fx.Node):
    """``F.normalize(x, p, dim)`` (cosine attention: Swin V2): per channel along other dims. Along the channel dim
    the p-norm (p > 0) is unchanged by exact zeros, so pruned positions must be zero there (checked)."""
    lab, src = cx.inp(node, 0, "input"), node.args[0] if node.args else node.kwargs.get("input")
    p, dim = cx.inp(node, 1, "p", 2.0), cx.inp(node, 2, "dim", 1)
    d = varying_dim(lab)
    if d is None or (isinstance(dim, int) and dim % lab.ndim != d):
        return lab
    if not isinstance(dim, int) or not isinstance(p, (int, float)) or p <= 0:
        cx.t.barrier(node, "normalizes across channels", lab)
        return cx.fixed(node)
    cx.t.checks.append(Check(node.name, src.name, d, lab.reshape(-1).clone(), "zero"))
    return lab


@channel_rule(nn.MultiheadAttention)
def multihead_attention(cx: RuleContext, node: fx.Node):
    """Declared barrier: ``nn.MultiheadAttention`` keeps ``embed_dim`` and its heads whole."""
    cx.t.barrier(
        node,
        "nn.MultiheadAttention: embed_dim and heads kept whole",
        [cx.value(a) for a in node.args] + [cx.value(v) for v in node.kwargs.values()],
    )
    return cx.fixed(node)


@channel_rule(*_SWIN_FUSED, *_SWIN_BIAS)
def swin_attention(cx: RuleContext, node: fx.Node):
    """Declared barrier: torchvision's fused shifted-window attention takes qkv/proj weights as tensors (calls
    that ``window_attention.py`` cannot rewrite)."""
    cx.t.barrier(
        node,
        "torchvision fused window attention: heads and embedding kept whole",
        [cx.value(a) for a in node.args] + [cx.value(v) for v in node.kwargs.values()],
    )
    return cx.fixed(node)
