"""Rewrite torchvision Swin's fused ``shifted_window_attention`` calls (V1 and V2) into prunable graph ops:

``swa(x, Wqkv, Wproj, bias, ws, h, shift) -> unwindow(proj(attend(heads(qkv(window(x))), bias + shift_mask)))``
with ``window`` = pad, roll, ``view``/``permute``/``reshape`` into ``(B * nW, N, C)`` windows,
``heads(t) = t.reshape(-1, N, 3, h, C // h).permute(2, 0, 3, 1, 4)``, ``attend`` = ``q * scale @ k^T`` (V2: cosine
``normalize(q) @ normalize(k)^T * exp(clamp(logit_scale))``), ``+ bias`` per head, ``+`` the shifted-window mask
(a constant buffer ``shift_mask`` of the attention module, computed once for the traced size), softmax, ``@ v``,
and ``unwindow`` its inverse. The packed ``qkv``/``proj`` tensors become ``nn.Linear`` modules sharing the same
parameters (V2: ``qkv.bias`` with its key third zeroed, as the function does on every call). The wrapped
``_get_relative_position_bias(table, index, ws)`` feeding it becomes ``table[index].view(N, N, -1).permute(2, 0,
1).contiguous().unsqueeze(0)``, so the table (V2: the ``cpb_mlp`` output rows) is sliced per head.

Within-head dims and whole heads then prune through the ordinary rules (``heads.py``). Sizes are literal except
the batch (``-1``), so shrink rewrites the head count or head dim; the spatial size is the traced one.
Calls whose operands are not plain parameter reads stay a declared barrier (``rules_attention.swin_attention``).
"""

from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from sparsifx.meta_keys import TENSOR_META

try:
    from torchvision.models import swin_transformer as _swin

    _FUSED = _swin.shifted_window_attention
    _BIAS = getattr(_swin, "_get_relative_position_bias", None)
except ImportError:  # pragma: no cover
    _FUSED = _BIAS = None


def has_window_attention(gm: fx.GraphModule) -> bool:
    return _FUSED is not None and any(n.op == "call_function" and n.target is _FUSED for n in gm.graph.nodes)


def decompose_window_attention(gm: fx.GraphModule) -> int:
    """Rewrite every plain ``shifted_window_attention`` call of ``gm``; returns how many were rewritten."""
    if _FUSED is None:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _FUSED:
            args = _bound(node)
            if args is not None:
                _rewrite(gm, node, args)
                count += 1
    if count:
        for node in list(gm.graph.nodes):
            _bias_node(gm, node)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return count


def _bound(node: fx.Node) -> dict | None:
    """The call's arguments by name when it can be rewritten, else None."""
    try:
        bound = inspect.signature(_FUSED).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = dict(bound.arguments)
    meta = a["input"].meta.get(TENSOR_META) if isinstance(a["input"], fx.Node) else None
    reads = [a["qkv_weight"], a["proj_weight"]] + [a[k] for k in ("qkv_bias", "proj_bias") if a[k] is not None]
    if meta is None or len(meta.shape) != 4 or not all(isinstance(r, fx.Node) and r.op == "get_attr" for r in reads):
        return None
    if not isinstance(a["num_heads"], int) or any(
        not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(i, int) for i in v)
        for v in (a["window_size"], a["shift_size"])
    ):
        return None
    if (
        not all(isinstance(a[k], (int, float)) for k in ("attention_dropout", "dropout"))
        or not isinstance(a["training"], bool)
        or meta.shape[3] % a["num_heads"]
    ):
        return None
    return a


class _Emitter:
    """Inserts nodes before ``anchor`` with ``tensor_meta`` computed on the meta device (no model run)."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.g, self.anchor = gm, gm.graph, anchor
        self.keep = {k: anchor.meta[k] for k in ("nn_module_stack", "stack_trace") if k in anchor.meta}

    def _meta(self, value):
        if isinstance(value, fx.Node):
            m = value.meta[TENSOR_META]
            return torch.empty(m.shape, dtype=m.dtype, device="meta")
        return value

    def node(self, op: str, target, *args, **kwargs) -> fx.Node:
        with self.g.inserting_before(self.anchor):
            n = self.g.create_node(op, target, args, kwargs)
        n.meta.update(self.keep)
        a, kw = fx.node.map_aggregate((args, kwargs), self._meta)
        if op == "get_attr":
            out = torch.empty_like(_fetch(self.gm, target), device="meta")
        elif op == "call_module":
            mod = self.gm.get_submodule(target)
            out = F.linear(a[0], mod.weight.to("meta"), None if mod.bias is None else mod.bias.to("meta"))
        elif op == "call_method":
            out = getattr(a[0], target)(*a[1:], **kw)
        else:
            out = target(*a, **kw)
        n.meta[TENSOR_META] = _extract_tensor_metadata(out)
        return n

    def fn(self, target, *args, **kwargs) -> fx.Node:
        return self.node("call_function", target, *args, **kwargs)

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self.node("call_method", name, *args, **kwargs)


def _fetch(gm: fx.GraphModule, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _linear(gm: fx.GraphModule, weight: fx.Node, bias: fx.Node | None, zero_key_bias: bool = False) -> str:
    """An ``nn.Linear`` at the weight's owner path sharing its parameters; returns the path."""
    owner, _, attr = weight.target.rpartition(".")
    holder = gm.get_submodule(owner)
    if (
        isinstance(holder, nn.Linear)
        and attr == "weight"
        and not zero_key_bias
        and (bias.target if bias is not None else None) == (f"{owner}.bias" if holder.bias is not None else None)
    ):
        return owner
    w = _fetch(gm, weight.target)
    b = _fetch(gm, bias.target) if bias is not None else None
    lin = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None)
    lin.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w.detach())
    if b is not None:
        if zero_key_bias:  # V2: the function zeroes the key third of the bias on every call
            b = b.detach().clone()
            b[b.numel() // 3 : 2 * b.numel() // 3] = 0
        lin.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b.detach())
    exclusive = (
        attr == "weight"
        and set(holder._parameters) <= {"weight", "bias"}
        and not holder._modules
        and not holder._buffers
        and (bias is None or bias.target == f"{owner}.bias")
        and type(holder) is nn.Module
    )
    path = owner if exclusive and owner else _free_name(gm, f"{owner.replace('.', '_') or 'root'}_linear")
    if path == owner:
        parent, _, child = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, lin)
    else:
        gm.add_submodule(path, lin)
    return path


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _shift_mask(pad_h: int, pad_w: int, ws: list[int], shift: list[int], dtype) -> torch.Tensor:
    """torchvision's shifted-window attention mask, shaped ``(1, nW, 1, N, N)`` to add to ``(B, nW, h, N, N)``."""
    mask = torch.zeros((pad_h, pad_w), dtype=dtype)
    h_slices = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    n_windows = (pad_h // ws[0]) * (pad_w // ws[1])
    mask = mask.view(pad_h // ws[0], ws[0], pad_w // ws[1], ws[1]).permute(0, 2, 1, 3)
    mask = mask.reshape(n_windows, ws[0] * ws[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    return mask.unsqueeze(1).unsqueeze(0).contiguous()


def _bias_node(gm: fx.GraphModule, bias: fx.Node) -> None:
    """``_get_relative_position_bias(table, index, ws)`` as graph ops (V1: the bias itself; V2: inside
    ``16 * sigmoid(.)`` of the ``cpb_mlp`` output)."""
    if not (
        bias.op == "call_function"
        and bias.target is _BIAS
        and _BIAS is not None
        and len(bias.args) == 3
        and all(isinstance(a, fx.Node) for a in bias.args[:2])
        and isinstance(bias.args[2], (list, tuple))
    ):
        return
    table, index, ws = bias.args
    n_tokens = ws[0] * ws[1]
    e = _Emitter(gm, bias)
    t = e.fn(operator.getitem, table, index)
    t = e.method("view", t, n_tokens, n_tokens, -1)
    t = e.method("contiguous", e.method("permute", t, 2, 0, 1))
    bias.replace_all_uses_with(e.method("unsqueeze", t, 0))


def _rewrite(gm: fx.GraphModule, node: fx.Node, a: dict) -> None:
    x, heads = a["input"], a["num_heads"]
    _, height, width, c = a["input"].meta[TENSOR_META].shape
    dtype = a["input"].meta[TENSOR_META].dtype
    ws, d = list(a["window_size"]), c // heads
    n = ws[0] * ws[1]
    pad_r, pad_b = (ws[1] - width % ws[1]) % ws[1], (ws[0] - height % ws[0]) % ws[0]
    ph, pw = height + pad_b, width + pad_r
    shift = [0 if ws[0] >= ph else a["shift_size"][0], 0 if ws[1] >= pw else a["shift_size"][1]]
    n_windows = (ph // ws[0]) * (pw // ws[1])
    v2 = a["logit_scale"] is not None
    qkv = _linear(gm, a["qkv_weight"], a["qkv_bias"], zero_key_bias=v2)
    proj = _linear(gm, a["proj_weight"], a["proj_bias"])
    e = _Emitter(gm, node)
    bias = a["relative_position_bias"]
    if pad_r or pad_b:
        x = e.fn(F.pad, x, (0, 0, 0, pad_r, 0, pad_b))
    if sum(shift) > 0:
        x = e.fn(torch.roll, x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = e.method("view", x, -1, ph // ws[0], ws[0], pw // ws[1], ws[1], c)
    x = e.method("reshape", e.method("permute", x, 0, 1, 3, 2, 4, 5), -1, n, c)
    t = e.method("reshape", e.node("call_module", qkv, x), -1, n, 3, heads, d)
    t = e.method("permute", t, 2, 0, 3, 1, 4)
    q, k, v = (e.fn(operator.getitem, t, i) for i in range(3))
    if v2:
        attn = e.fn(
            operator.matmul, e.fn(F.normalize, q, dim=-1), e.method("transpose", e.fn(F.normalize, k, dim=-1), -2, -1)
        )
        scale = e.method("exp", e.fn(torch.clamp, a["logit_scale"], max=math.log(100.0)))
        attn = e.fn(operator.mul, attn, scale)
    else:
        attn = e.method("matmul", e.fn(operator.mul, q, d**-0.5), e.method("transpose", k, -2, -1))
    attn = e.fn(operator.add, attn, bias)
    if sum(shift) > 0:
        owner = a["qkv_weight"].target.rpartition(".")[0].rpartition(".")[0]
        holder = gm.get_submodule(owner) if owner else gm
        name = _free_name(holder, "shift_mask")
        holder.register_buffer(name, _shift_mask(ph, pw, ws, shift, dtype))
        attn = e.method("view", attn, -1, n_windows, heads, n, n)
        attn = e.fn(operator.add, attn, e.node("get_attr", f"{owner}.{name}" if owner else name))
        attn = e.method("view", attn, -1, heads, n, n)
    attn = e.fn(F.softmax, attn, dim=-1)
    if a["attention_dropout"]:
        attn = e.fn(F.dropout, attn, p=a["attention_dropout"], training=a["training"])
    x = e.method("reshape", e.method("transpose", e.method("matmul", attn, v), 1, 2), -1, n, c)
    x = e.node("call_module", proj, x)
    if a["dropout"]:
        x = e.fn(F.dropout, x, p=a["dropout"], training=a["training"])
    x = e.method("view", x, -1, ph // ws[0], pw // ws[1], ws[0], ws[1], c)
    x = e.method("reshape", e.method("permute", x, 0, 1, 3, 2, 4, 5), -1, ph, pw, c)
    if sum(shift) > 0:
        x = e.fn(torch.roll, x, shifts=(shift[0], shift[1]), dims=(1, 2))
    if pad_r or pad_b:
        x = e.method(
            "contiguous", e.fn(operator.getitem, x, (slice(None), slice(None, height), slice(None, width), slice(None)))
        )
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
