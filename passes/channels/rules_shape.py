"""Rules for shape ops: reshape/flatten expand a channel into blocks (or split it, uniting the outer
factor: channel shuffle, head split), permute/transpose move the channel dim, cat offsets, split/chunk
index maps, getitem slices, reductions and spatial pooling. Ops whose constants depend on channel
counts record a ``Rewrite`` for the shrink pass."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.meta_keys import TENSOR_META

from . import rules_elementwise
from .heads import keep_heads
from .rules_base import UNKNOWN, RuleContext, channel_rule, find_rule, is_label, out_shape, shape_of
from .tracker import FIXED

try:
    from torchvision.models.swin_transformer import _patch_merging_pad

    _PATCH_MERGING = (_patch_merging_pad,)
except ImportError:  # pragma: no cover
    _PATCH_MERGING = ()


def varying_dim(lab: torch.Tensor) -> int | None:
    dims = [d for d in range(lab.ndim) if lab.shape[d] > 1]
    return dims[-1] if dims else None


def reshape_labels(cx: RuleContext, lab: torch.Tensor, in_shape, shape, node: fx.Node | None = None) -> torch.Tensor:
    """Labels after a reshape; ``node`` given: a head split keeps its head dim in a heads analysis (``heads.py``)."""
    if varying_dim(lab) is None:
        return lab.reshape(-1)[:1].reshape((1,) * len(shape))
    full = lab.expand(in_shape).reshape(shape)
    return cx.t.normalize(full if node is None else keep_heads(cx, node, full))


def size_args(node: fx.Node) -> tuple[list | fx.Node, str]:
    """The target sizes of a view/reshape/expand node and how they are written: ``"shape"`` (``torch.reshape(x,
    shape)``), ``"tuple"`` (``x.view((a, b))``) or ``"varargs"`` (``x.view(a, b)``), each a list with one entry
    per output dim; or one graph node computing the whole shape (``x.reshape(x.shape[:-1] + (-1,))``; of a 1-d
    output, a node may also be its one size: listed, it is rewritten like a constant)."""
    args = node.args
    if node.op == "call_function":
        sizes, put = args[1] if len(args) > 1 else node.kwargs["shape"], "shape"
    elif len(args) == 2 and isinstance(args[1], (tuple, list, fx.Node)):
        sizes, put = args[1], "tuple"
    else:
        return list(args[1:]), "varargs"
    if isinstance(sizes, fx.Node):
        return (sizes, put) if len(out_shape(node) or ()) > 1 else ([sizes], put)
    return list(sizes), put


def record_sizes(cx: RuleContext, node: fx.Node, out: torch.Tensor, lab: torch.Tensor) -> bool:
    """Record the ``sizes`` rewrite of a view/reshape/expand whose output varies along a channel dim. A shape
    computed in the graph cannot be rewritten: fine where it says ``-1`` there (inferred from the kept channels),
    a barrier otherwise (False)."""
    d = varying_dim(out)
    if d is None:
        return True
    sizes, _ = size_args(node)
    if isinstance(sizes, fx.Node):
        value = cx.value(sizes)
        if isinstance(value, (tuple, list)) and len(value) == out.ndim and value[d] == -1:
            return True
        cx.t.barrier(node, "sizes the channel dim by a computed shape (shrink cannot rewrite it)", lab)
        return False
    cx.t.rewrite_node(node, "sizes", labels=out)
    return True


@channel_rule(
    "method:view",
    "method:reshape",
    torch.reshape,
    torch.flatten,
    "method:flatten",
    nn.Flatten,
    nn.Unflatten,
    torch.squeeze,
    "method:squeeze",
    torch.unsqueeze,
    "method:unsqueeze",
    "method:unflatten",
    torch.unflatten,
)
def reshape(cx: RuleContext, node: fx.Node):
    """``x.view(sizes)``: labels follow the row-major element order; a split channel keeps its inner factor."""
    lab, shape = cx.inp(node, 0, "input"), out_shape(node)
    out = reshape_labels(cx, lab, cx.inshape(node, 0, "input"), shape, node)
    explicit = node.target in ("view", "reshape") if node.op == "call_method" else node.target is torch.reshape
    if explicit and not record_sizes(cx, node, out, lab):
        return cx.fixed(node)
    return out


@channel_rule("method:expand")
def expand(cx: RuleContext, node: fx.Node):
    lab, shape = cx.inp(node), out_shape(node)
    out = lab.reshape((1,) * (len(shape) - lab.ndim) + tuple(lab.shape))
    return out if record_sizes(cx, node, out, lab) else cx.fixed(node)


@channel_rule(torch.permute, "method:permute")
def permute(cx: RuleContext, node: fx.Node):
    lab = cx.inp(node, 0, "input")
    dims = node.args[1:] if node.op == "call_method" else (cx.inp(node, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return lab.permute(*[int(d) for d in dims])


@channel_rule(torch.transpose, "method:transpose", torch.swapaxes, "method:swapaxes", torch.swapdims, "method:swapdims")
def transpose(cx: RuleContext, node: fx.Node):
    return cx.inp(node, 0, "input").transpose(int(cx.inp(node, 1, "dim0")), int(cx.inp(node, 2, "dim1")))


@channel_rule(torch.cat, torch.concat, torch.concatenate)
def cat(cx: RuleContext, node: fx.Node):
    """``cat(xs, dim)``: labels concatenate along ``dim`` (channel offset ranges)."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = cx.inp(node, 1, "dim", 0)
    return cat_labels(cx, [cx.value(t) for t in tensors], [shape_of(t) for t in tensors], dim)


def cat_labels(cx: RuleContext, labs, shapes, dim: int) -> torch.Tensor:
    nd = len(shapes[0])
    dim %= nd
    common = [1 if all(lab.shape[d] == 1 for lab in labs) else shapes[0][d] for d in range(nd)]
    parts = []
    for lab, shp in zip(labs, shapes):
        target = list(common)
        target[dim] = shp[dim]
        parts.append(lab.expand(target))
    return cx.t.normalize(torch.cat(parts, dim))


@channel_rule(torch.stack)
def stack(cx: RuleContext, node: fx.Node):
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = cx.inp(node, 1, "dim", 0)
    nd = len(shape_of(tensors[0])) + 1
    dim %= nd
    labs = [cx.value(t).unsqueeze(dim) for t in tensors]
    shapes = [shape_of(t)[:dim] + (1,) + shape_of(t)[dim:] for t in tensors]
    return cat_labels(cx, labs, shapes, dim)


@channel_rule(torch.chunk, "method:chunk", torch.split, "method:split", torch.functional.split)
def split(cx: RuleContext, node: fx.Node):
    """``split/chunk``: each piece takes its index range; constant sizes are rewritten by shrink."""
    lab = cx.inp(node, 0, "tensor" if node.op == "call_function" else None)
    metas = node.meta[TENSOR_META]
    dim = cx.inp(node, 2, "dim", 0) % lab.ndim
    sizes = [m.shape[dim] for m in metas]
    if lab.shape[dim] == 1:
        return tuple(lab for _ in sizes)
    cx.t.rewrite_node(node, "split", vec=lab.reshape(-1).clone(), dim=dim, sizes=sizes)
    return tuple(cx.t.normalize(p) for p in torch.split(lab, sizes, dim))


@channel_rule(torch.unbind, "method:unbind")
def unbind(cx: RuleContext, node: fx.Node):
    """``x.unbind(dim)`` (timm's ``q, k, v = qkv.unbind(0)``): each item is ``x[i]`` along ``dim``; along a dim
    without channels the items keep them (a q/k/v split of a head reshape keeps its inner factor)."""
    lab = cx.inp(node, 0, "input")
    dim, n = cx.inp(node, 1, "dim", 0), len(node.meta.get(TENSOR_META) or ())
    if not is_label(lab) or not isinstance(dim, int):
        cx.t.barrier(node, "unbind along a dim not known statically", lab)
        return cx.fixed(node)
    dim %= lab.ndim
    if varying_dim(lab) == dim:
        cx.t.barrier(node, "unbinds the channel dim", lab)
        return cx.fixed(node)
    return tuple(lab.squeeze(dim) for _ in range(n))


@channel_rule("fn:_operator.getitem")
def getitem(cx: RuleContext, node: fx.Node):
    """``x[idx]`` on containers (static) and tensors (slices/ints/None/Ellipsis; index tensors and lists on
    non-channel dims; an index tensor picking channels is a barrier)."""
    base, idx = cx.inp(node, 0), cx.inp(node, 1)
    if isinstance(base, (tuple, list, dict)):
        try:
            return base[idx]
        except (TypeError, KeyError, IndexError):  # an index the analysis could not evaluate
            cx.t.barrier(node, "item of a container at an unknown index", base)
            return cx.fixed(node)
    if not is_label(base):
        return cx.fixed(node)
    raw = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is UNKNOWN or (isinstance(i, list) and not all(isinstance(v, (int, list)) for v in i)) for i in idx):
        cx.t.barrier(node, "an index the analysis cannot evaluate", base)
        return cx.fixed(node)
    return index_labels(cx, node, base, idx, raw)


def _is_array(i) -> bool:
    return is_label(i) or isinstance(i, (list, torch.Tensor))


def _array_rank(i, r) -> tuple[bool, int]:
    """(is a bool mask, rank) of an index array: a graph tensor ``r`` (labels ``i``), a constant or a list."""
    if isinstance(r, fx.Node):
        meta = r.meta.get(TENSOR_META)
        return meta.dtype == torch.bool, len(meta.shape)
    t = torch.as_tensor(i)
    return t.dtype == torch.bool, t.ndim


def _span(i, r) -> int:
    """How many dims of the indexed tensor item ``i`` consumes (a bool mask: its rank)."""
    if i is None or i is Ellipsis:
        return 0
    if _is_array(i):
        mask, rank = _array_rank(i, r)
        return rank if mask else 1
    return 1


def _stand_ins(i, r, k: int) -> list:
    """Index arrays of ``i``'s rank (a mask: one per dim it spans), so that torch places the result dims."""
    mask, rank = _array_rank(i, r)
    zero = torch.zeros((1,) * (1 if mask else rank), dtype=torch.long)
    return [zero] * (k if mask else 1)


def index_labels(cx: RuleContext, node: fx.Node, lab: torch.Tensor, idx: tuple, raw: tuple):
    spans = [_span(i, r) for i, r in zip(idx, raw)]
    n_ell = lab.ndim - sum(spans)
    full = []  # (index item, its position in the node's index tuple, dims it spans)
    for p, (i, k) in enumerate(zip(idx, spans)):
        full.extend([(slice(None), None, 1)] * n_ell if i is Ellipsis else [(i, p, k)])
    full.extend([(slice(None), None, 1)] * (lab.ndim - sum(k for _, _, k in full)))
    new, d = [], 0
    for i, p, k in full:
        if i is None:
            new.append(None)
            continue
        varying = any(lab.shape[j] > 1 for j in range(d, d + k))
        if _is_array(i) and not varying:
            new.extend(_stand_ins(i, raw[p], k))
            cx.t.fix(i if is_label(i) else None)
        elif not varying:
            new.append(0 if isinstance(i, int) else slice(None))
        elif isinstance(i, slice) and i.step in (None, 1):
            new.append(i)
            if (i.start, i.stop) != (None, None):
                cx.t.rewrite_node(node, "slice", vec=lab.reshape(-1).clone(), pos=p)
        else:  # an int, an index array or a strided pick of channels: shrink cannot renumber it
            cx.t.barrier(node, "picks channels by index (shrink cannot renumber it)", [lab, i if is_label(i) else None])
            return cx.fixed(node)
        d += k
    out = lab[tuple(new)]
    if out.ndim != len(out_shape(node)):
        cx.t.barrier(node, "indexing the analysis cannot follow", lab)
        return cx.fixed(node)
    return cx.t.normalize(out)


REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var)
# vector/matrix norms ``(x, p|ord, dim, keepdim)``: per channel where ``dim`` leaves the channel dim out
NORMS = (torch.norm, torch.linalg.norm, torch.linalg.vector_norm)


@channel_rule(*REDUCTIONS, *(f"method:{m}" for m in ("mean", "sum", "amax", "amin", "std", "var")))
def reduce(cx: RuleContext, node: fx.Node):
    """Reduction over ``dim``: channels varying along a reduced dim are fixed (the result would change)."""
    return reduce_labels(
        cx, node, cx.inp(node, 0, "input"), cx.inp(node, 1, "dim"), bool(cx.inp(node, 2, "keepdim", False))
    )


@channel_rule(*NORMS, "method:norm")
def norm(cx: RuleContext, node: fx.Node):
    """``x.norm(p, dim, keepdim)`` (timm's GlobalResponseNorm: ``x.norm(p=2, dim=(1, 2), keepdim=True)``): a
    reduction over ``dim``; ``torch.linalg.norm``'s ``ord`` / ``dim`` and ``torch.norm``'s ``p`` share positions."""
    return reduce_labels(
        cx, node, cx.inp(node, 0, "input"), cx.inp(node, 2, "dim"), bool(cx.inp(node, 3, "keepdim", False))
    )


def reduce_labels(cx: RuleContext, node: fx.Node, lab: torch.Tensor, dims, keep: bool):
    """Labels of ``lab`` reduced over ``dims`` (``None``: every dim): per channel unless the channel dim is
    reduced, then a barrier (its channels are fixed); with ``streams="approximate"``, a normalisation statistic
    (``statistic``) is a recorded approximation instead, constant along every dim."""
    if dims is None or dims is UNKNOWN:
        cx.t.barrier(node, "reduces over all dims", lab)
        return cx.fixed(node)
    dims = sorted({d % lab.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))})
    d = varying_dim(lab)
    if d in dims:
        if cx.t.streams == "approximate" and keep and statistic(cx, node, d, lab.shape[d]):
            cx.t.approximate(node, "normalisation statistic over the channels", lab)
            return torch.full((1,) * lab.ndim, FIXED, dtype=torch.long)
        cx.t.barrier(node, "reduces across channels", lab)
        return cx.fixed(node)
    index = tuple(slice(0, 1) if (d in dims and keep) else (0 if d in dims else slice(None)) for d in range(lab.ndim))
    return lab[index]


STATISTICS = (torch.mean, torch.var, torch.std, "mean", "var", "std")


def statistic(cx: RuleContext, node: fx.Node, dim: int, size: int) -> bool:
    """Whether ``node`` (a keepdim reduction over the channel ``dim`` of ``size`` channels) is a normalisation
    statistic: a mean/var/std whose every use, through elementwise ops along which it stays size 1
    (``rsqrt(var + eps)``), ends in an elementwise op that broadcasts it back over the channels (LayerNorm and
    RMSNorm written out: ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``)."""
    if node.target not in STATISTICS or size < 2 or out_shape(node) is None:
        return False
    nd, stack, seen = len(out_shape(node)), [node], set()
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            shape = out_shape(user)
            if (
                find_rule(cx.gm, user) not in (rules_elementwise.unary, rules_elementwise.elementwise)
                or shape is None
                or len(shape) != nd
                or shape[dim] not in (1, size)
            ):
                return False
            if shape[dim] == 1:
                stack.append(user)
    return bool(seen)


POOLS = (
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.interpolate,
    F.upsample,
)
POOL_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Upsample,
)


@channel_rule(*POOLS, *POOL_MODULES)
def pool(cx: RuleContext, node: fx.Node):
    """Spatial pooling ``(N, C, *spatial)``: per channel; atoms varying over space are united."""
    lab, shape = cx.inp(node, 0, "input"), out_shape(node)
    if isinstance(shape, tuple) and len(shape) >= 3:
        return cx.t.place(cx.t.along(lab, 1, shape[1]), 1, len(shape))
    cx.t.barrier(node, "pooling on unexpected rank", lab)
    return cx.fixed(node)


@channel_rule(F.pad)
def pad(cx: RuleContext, node: fx.Node):
    return pad_labels(cx, node, cx.inp(node, 0, "input"), cx.inp(node, 1, "pad"))


def pad_labels(cx: RuleContext, node: fx.Node, lab: torch.Tensor, widths):
    """Padding ``widths`` (last dim first, as ``F.pad``): a barrier if the channel dim is padded."""
    d = varying_dim(lab)
    if d is not None and not isinstance(widths, (tuple, list)):
        cx.t.barrier(node, "padding widths not known statically", lab)
        return cx.fixed(node)
    if d is not None:
        k = lab.ndim - 1 - d
        if 2 * k < len(widths) and (widths[2 * k] or widths[2 * k + 1]):
            cx.t.barrier(node, "pads the channel dim", lab)
            return cx.fixed(node)
    return lab


@channel_rule(torch.roll)
def roll(cx: RuleContext, node: fx.Node):
    lab, dims = cx.inp(node, 0, "input"), cx.inp(node, 2, "dims")
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    if varying_dim(lab) in {int(d) % lab.ndim for d in dims if isinstance(d, int)}:
        cx.t.barrier(node, "rolls the channel dim", lab)
        return cx.fixed(node)
    return lab


@channel_rule(*_PATCH_MERGING)
def patch_merging_pad(cx: RuleContext, node: fx.Node):
    """torchvision Swin: ``(.., H, W, C) -> (.., H/2, W/2, 4C)`` = cat of four strided views along C."""
    lab, shp = cx.inp(node), cx.inshape(node)
    return cat_labels(cx, [lab] * 4, [shp] * 4, -1)
