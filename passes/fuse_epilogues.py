"""Pass ``fuse_epilogues``: fold a residual add and a ReLU / ReLU6 into the lowered sparse convolution that feeds
them (an ``OrtConv2d``, a dense layer onnxruntime runs, takes the activation only).

Rewrites ``act(conv(x) + r)`` -> ``conv(x, r)`` with the module's ``residual`` and ``activation`` set, and
``act(conv(x))`` -> ``conv(x)`` with ``activation`` set, for ``DirectSparseConv2d`` modules whose output has no other
user,
so that the output is written once instead of read and written again by each elementwise op. Then a direct
convolution whose only user is a stride-1 "same" direct convolution writes its output zero-padded
(``out_pad``), and the consumer (``in_padded``) reads it as its grid: the padding copy is gone. A residual is fused
only when shape propagation recorded both operands with the same shape (no broadcasting). A module called from two
places is left alone. Run by ``lower`` (``fuse: true``) or as its own stage after it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.meta_keys import TENSOR_META
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass

ADDS = {
    ("call_function", operator.add),
    ("call_function", operator.iadd),
    ("call_function", torch.add),
    ("call_method", "add"),
    ("call_method", "add_"),
}
# (op, target) -> the fused activation it is; modules by class
ACTIVATION_CALLS = {
    ("call_function", torch.relu): "relu",
    ("call_function", F.relu): "relu",
    ("call_function", torch.relu_): "relu",
    ("call_method", "relu"): "relu",
    ("call_method", "relu_"): "relu",
    ("call_function", F.relu6): "relu6",
}
ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def _activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return ACTIVATION_MODULES.get(type(gm.get_submodule(node.target)))
    if len(node.args) != 1 or not set(node.kwargs) <= {"inplace"}:
        return None
    return ACTIVATION_CALLS.get((node.op, node.target))


def _other_addend(node: fx.Node, conv: fx.Node) -> fx.Node | None:
    """The tensor added to ``conv`` by ``node`` (a plain two-operand add), or ``None``."""
    if (node.op, node.target) not in ADDS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is conv else a if b is conv else None
    if not isinstance(other, fx.Node) or other is conv:
        return None
    shape = [n.meta.get(TENSOR_META) for n in (conv, other)]
    if any(m is None or not hasattr(m, "shape") for m in shape) or shape[0].shape != shape[1].shape:
        return None
    if shape[1].dtype != torch.float32:
        return None
    return other


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _single_calls(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """``{module target: its node}`` for the modules the graph calls exactly once (fusing into a module called
    from two places would change the other call)."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return {target: nodes[0] for target, nodes in calls.items() if len(nodes) == 1}


def fusable_activations(gm: fx.GraphModule) -> dict[str, str]:
    """``{module target: activation}`` for modules called once whose only user is a ReLU / ReLU6 (what the
    direct convolution would fuse if the module were lowered to it)."""
    out = {}
    for target, node in _single_calls(gm).items():
        user = _only_user(node)
        activation = _activation(gm, user) if user is not None else None
        if activation is not None:
            out[target] = activation
    return out


@register_pass("fuse_epilogues")
class FuseEpilogues(PassBase):
    """``act(conv(x) + r)`` -> ``conv(x, r)`` (fused) on lowered ``DirectSparseConv2d`` layers; a layer that
    feeds only a stride-1 "same" direct convolution writes its output padded for it."""

    in_place = True
    preserves_semantics = True
    invalidates_analyses = ()

    def call(self, gm: fx.GraphModule) -> PassResult:
        from sparsifx.backends.ort_conv import OrtConv2d
        from sparsifx.backends.sparse_conv import DirectSparseConv2d

        single = _single_calls(gm)
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node.target not in single or len(node.args) != 1 or node.kwargs:
                continue
            module = gm.get_submodule(node.target)
            if (
                not isinstance(module, (DirectSparseConv2d, OrtConv2d))
                or module.activation
                or getattr(module, "residual", False)
            ):
                continue
            modified |= self._fuse(gm, node, module)
        for node in list(gm.graph.nodes):
            modified |= self._pad_for_next(gm, node, single)
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    @staticmethod
    def _pad_for_next(gm: fx.GraphModule, node: fx.Node, single: dict[str, fx.Node]) -> bool:
        """A direct convolution whose only user is a stride-1 "same" direct convolution writes its output
        already padded for it (one memory pass less: the consumer reads it as its grid)."""
        from sparsifx.backends.sparse_conv import DirectSparseConv2d, is_same_stride1

        user = _only_user(node) if node.op == "call_module" and node.target in single else None
        if user is None or user.op != "call_module" or user.target not in single or user.args[0] is not node:
            return False
        producer, consumer = gm.get_submodule(node.target), gm.get_submodule(user.target)
        if not (isinstance(producer, DirectSparseConv2d) and isinstance(consumer, DirectSparseConv2d)):
            return False
        if (
            any(producer.out_pad)
            or consumer.in_padded
            or not any(consumer.padding)
            or not is_same_stride1(consumer.kernel_size, consumer.stride, consumer.padding, consumer.dilation)
        ):
            return False
        producer.out_pad, consumer.in_padded = tuple(consumer.padding), True
        for m in (producer, consumer):
            m.drop_transient()  # re-planned with the new layout
        return True

    @staticmethod
    def _fuse(gm: fx.GraphModule, node: fx.Node, module) -> bool:
        user = _only_user(node)
        fused = False
        fuses_residual = hasattr(module, "residual")  # the direct kernel adds one; onnxruntime's Conv does not here
        other = _other_addend(user, node) if user is not None and fuses_residual else None
        if other is not None:
            user.prepend(node)  # the addend is defined before the add, so the conv may move there
            node.args = (node.args[0], other)
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            module.residual, fused = True, True
            user = _only_user(node)
        activation = _activation(gm, user) if user is not None else None
        if activation is not None:
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            module.activation, fused = activation, True
        return fused
