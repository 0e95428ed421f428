"""Rewrite ``nn.MultiheadAttention`` calls into prunable parts before channel analysis:

``mha(q, k, v, need_weights=False) -> out_proj(sdpa(heads(q_proj(q)), heads(k_proj(k)), heads(v_proj(v)),
scale=1/sqrt(head_dim)))`` with ``heads(x) = x.unflatten(-1, (h, -1)).transpose(-3, -2)``. Plain ``nn.Linear``
modules replace the packed projections, so within-head dims become ordinary channels (q/k united by the
contraction, v's flowing into ``out_proj``); the explicit scale keeps the result exact after shrinking.
Only the eval-time self/cross attention without masks, bias_kv or zero_attn is rewritten; other calls
stay a declared barrier. torchvision Swin's fused window attention is rewritten too (``window_attention.py``).

The head split is written ``unflatten(-1, (h, -1))`` for within-head dims and ``unflatten(-1, (-1, head_dim))`` for
whole heads (``heads=True``), so that shrink's inferred ``-1`` is the dim that shrinks; calling again with the
other choice restyles splits rewritten earlier (tagged ``node.meta["head_split"]``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.meta_keys import TENSOR_META

from .window_attention import decompose_window_attention, has_window_attention

HEAD_SPLIT = "head_split"


def _plain(m: nn.MultiheadAttention, node: fx.Node) -> bool:
    kwargs = dict(node.kwargs)
    extra = list(node.args[3:])
    masks = [kwargs.get("key_padding_mask"), kwargs.get("attn_mask")] + extra[:1] + extra[2:3]
    causal = kwargs.get("is_causal", extra[4] if len(extra) > 4 else False)
    weights_unused = all(
        u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users
    )
    return (
        m._qkv_same_embed_dim
        and m.in_proj_bias is not None
        and m.bias_k is None
        and not m.add_zero_attn
        and m.dropout == 0.0
        and all(x is None for x in masks)
        and not causal
        and weights_unused
        and len(node.args) >= 3
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _seq_batch(src: fx.Node, batch_first: bool) -> tuple[int, int]:
    shape = tuple(src.meta[TENSOR_META].shape) if TENSOR_META in src.meta else (0, 0, 0)
    return (shape[1], shape[0]) if batch_first else (shape[0], shape[1])


def has_attention(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` holds attention that ``decompose_attention`` may rewrite or restyle."""
    return (
        any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
        or has_window_attention(gm)
        or any(HEAD_SPLIT in n.meta for n in gm.graph.nodes)
    )


def decompose_attention(gm: fx.GraphModule, heads: bool = False) -> int:
    """Rewrite every plain ``nn.MultiheadAttention`` call and torchvision window attention in ``gm``, writing head
    splits for whole heads (``heads``) or within-head dims; returns how many calls were rewritten or restyled."""
    count = decompose_window_attention(gm) + _restyle(gm, heads)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            continue
        m = gm.get_submodule(node.target)
        if not _plain(m, node):
            continue
        _rewrite(gm, node, m, heads)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return count


def _split_sizes(h: int, d: int, heads: bool) -> tuple[int, int]:
    return (-1, d) if heads else (h, -1)


def _restyle(gm: fx.GraphModule, heads: bool) -> int:
    """Rewrite earlier head splits (``unflatten``) for ``heads``; returns how many changed."""
    count = 0
    for node in gm.graph.nodes:
        if node.meta.get(HEAD_SPLIT) and TENSOR_META in node.meta:
            h, d = node.meta[TENSOR_META].shape[-2:]
            sizes = _split_sizes(h, d, heads)
            if tuple(node.args[2]) != sizes:
                node.args = (node.args[0], node.args[1], sizes)
                count += 1
    if count:
        gm.recompile()
    return count


def _rewrite(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention, whole_heads: bool) -> None:
    e, h = m.embed_dim, m.num_heads
    name = node.target
    w, b = m.in_proj_weight.detach(), m.in_proj_bias.detach()
    parts = {
        "q_proj": _linear(w[:e], b[:e]),
        "k_proj": _linear(w[e : 2 * e], b[e : 2 * e]),
        "v_proj": _linear(w[2 * e :], b[2 * e :]),
        "out_proj": _linear(m.out_proj.weight.detach(), m.out_proj.bias),
    }
    batch_first = m.batch_first
    gm.delete_submodule(name)
    for key, lin in parts.items():
        gm.add_submodule(f"{name}.{key}", lin)
    g = gm.graph
    ref = node.args[0].meta.get(TENSOR_META)

    def shaped(new: fx.Node, *shape: int) -> fx.Node:  # shapes known in closed form: no model run needed
        if ref is not None:
            stride = [1] * len(shape)
            for i in range(len(shape) - 2, -1, -1):
                stride[i] = stride[i + 1] * shape[i + 1]
            new.meta[TENSOR_META] = ref._replace(shape=torch.Size(shape), stride=tuple(stride))
        return new

    with g.inserting_before(node):
        heads = []
        for key, src in zip(("q_proj", "k_proj", "v_proj"), node.args[:3]):
            n, b = _seq_batch(src, batch_first)
            if not batch_first:
                src = shaped(g.call_method("transpose", (src, 0, 1)), b, n, e)
            x = shaped(g.call_module(f"{name}.{key}", (src,)), b, n, e)
            x = shaped(g.call_method("unflatten", (x, -1, _split_sizes(h, e // h, whole_heads))), b, n, h, e // h)
            x.meta[HEAD_SPLIT] = True
            heads.append(shaped(g.call_method("transpose", (x, -3, -2)), b, h, n, e // h))
        lq, b = _seq_batch(node.args[0], batch_first)
        att = shaped(
            g.call_function(F.scaled_dot_product_attention, tuple(heads), {"scale": (e // h) ** -0.5}), b, h, lq, e // h
        )
        merged = shaped(g.call_method("transpose", (att, -3, -2)), b, lq, h, e // h)
        merged = shaped(g.call_method("flatten", (merged, -2)), b, lq, e)
        out = shaped(g.call_module(f"{name}.out_proj", (merged,)), b, lq, e)
        if not batch_first:
            out = shaped(g.call_method("transpose", (out, 0, 1)), lq, b, e)
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
