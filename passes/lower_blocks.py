"""``lower``'s block step: MobileNetV2-style inverted residual blocks run as one fused sparse kernel.

Finds, in the graph before its layers are lowered, chains ``conv1x1 -> [act] -> depthwise -> [act] -> conv1x1
[-> + x]`` (each node the only user of the one before, each module called once, ``act`` a ReLU / ReLU6), and after
the layers are lowered one by one replaces a chain with a ``SparseInvertedResidual`` (``backends/sparse_block.py``)
where that is measured faster than the three lowered layers (the sum of their own timings, each with its
activation). Rewrites ``x -> expand -> act -> dw -> act -> project (-> add x)`` to ``x -> block``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx.meta_keys import TENSOR_META

from .fuse_epilogues import _activation, _only_user, _other_addend, _single_calls


@dataclass
class BlockMatch:
    """One inverted residual block of a graph: its three convolutions (module targets), their activations, the
    nodes it replaces (in graph order), its output node and whether it adds its input."""

    convs: tuple[str, str, str]
    activations: tuple[str | None, str | None]
    nodes: list[fx.Node]
    output: fx.Node
    residual: bool


def _conv_node(gm: fx.GraphModule, node: fx.Node | None, single: dict) -> nn.Conv2d | None:
    """The ``nn.Conv2d`` ``node`` calls with one positional argument (once in the graph), or None."""
    if node is None or node.op != "call_module" or single.get(node.target) is not node:
        return None
    if len(node.args) != 1 or node.kwargs:
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, nn.Conv2d) else None


def _after(gm: fx.GraphModule, node: fx.Node, nodes: list[fx.Node]) -> tuple[fx.Node | None, str | None]:
    """Step over an activation that is ``node``'s only user: ``(next node, activation)``; the nodes passed are
    appended to ``nodes``."""
    user = _only_user(node)
    if user is None:
        return None, None
    activation = _activation(gm, user)
    if activation is None:
        return user, None
    nodes.append(user)
    return _only_user(user), activation


def find_blocks(gm: fx.GraphModule) -> list[BlockMatch]:
    """Every inverted residual block of ``gm`` that ``SparseInvertedResidual`` can run."""
    from sparsifx.backends.sparse_block import block_supported

    single = _single_calls(gm)
    found, used = [], set()
    for node in gm.graph.nodes:
        expand = _conv_node(gm, node, single)
        if expand is None or node in used:
            continue
        nodes = [node]
        dw_node, act_e = _after(gm, node, nodes)
        depthwise = _conv_node(gm, dw_node, single)
        if depthwise is None:
            continue
        nodes.append(dw_node)
        pr_node, act_d = _after(gm, dw_node, nodes)
        project = _conv_node(gm, pr_node, single)
        if project is None or block_supported(expand, depthwise, project) is not None:
            continue
        nodes.append(pr_node)
        x, output, residual = node.args[0], pr_node, False
        user = _only_user(pr_node)
        if user is not None and _other_addend(user, pr_node) is x and depthwise.stride == (1, 1):
            nodes.append(user)
            output, residual = user, True
        if not isinstance(x, fx.Node):
            continue
        found.append(BlockMatch((node.target, dw_node.target, pr_node.target), (act_e, act_d), nodes, output, residual))
        used.update(nodes)
    return found


def block_name(gm: fx.GraphModule, convs: tuple[str, ...]) -> str:
    """A fresh top-level module name for the block of ``convs``: their common path, dots as underscores."""
    prefix = os.path.commonprefix([c.split(".") for c in convs])
    base = "_".join(prefix) + "_block" if prefix else "block"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}{i}", i + 1
    return name


def replace_block(gm: fx.GraphModule, match: BlockMatch, module: nn.Module) -> str:
    """Rewrite ``match``'s nodes to one call of ``module`` (registered under a fresh name, returned); the
    convolutions and activation modules it replaces are deleted."""
    name = block_name(gm, match.convs)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(match.output):  # the input as it is now (a block before may have replaced it)
        call = gm.graph.call_module(name, (match.nodes[0].args[0],))
    if TENSOR_META in match.output.meta:
        call.meta[TENSOR_META] = match.output.meta[TENSOR_META]
    match.output.replace_all_uses_with(call)
    targets = [n.target for n in match.nodes if n.op == "call_module"]
    for node in reversed(match.nodes):
        gm.graph.erase_node(node)
    for target in targets:
        gm.delete_submodule(target)
    gm.recompile()
    return name


def block_macs(module: nn.Module, shape: tuple[int, ...]) -> tuple[dict, dict, dict]:
    """``{"dense_macs", "executed_macs"}`` of the block's three layers on an input of ``shape``: the 1x1 layers
    their non-zeros per position (the expand also at the ``k - s`` rows recomputed where threads split an image,
    not counted here), the depthwise layer its non-zero taps per channel where fewer than half are non-zero (what
    the kernel skips), else all of them."""
    n, _, h, w = shape
    k, s = module.kernel, module.stride
    ho, wo = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
    e_nnz, p_nnz = module.nnz
    expand = {"dense_macs": module.expanded * module.in_channels * n * h * w, "executed_macs": e_nnz * n * h * w}
    taps = (module.dw != 0).sum(1)
    run = int(torch.where(2 * taps < k * k, taps, k * k).sum())
    dw = {"dense_macs": module.expanded * k * k * n * ho * wo, "executed_macs": run * n * ho * wo}
    project = {"dense_macs": module.out_channels * module.expanded * n * ho * wo, "executed_macs": p_nnz * n * ho * wo}
    return expand, dw, project


def plan_block(
    gm: fx.GraphModule, match: BlockMatch, originals: dict, weights: dict, infos: dict, shape, reps: int
) -> dict | None:
    """Build the fused block of ``match`` and time it on ``shape``; replace the lowered layers with it if it is
    faster than the sum of their timings. Returns what was decided (None: the layers were not all timed)."""
    from sparsifx.backends.cost_model import median_ms
    from sparsifx.backends.sparse_block import SparseInvertedResidual

    layer_infos = [infos.get(t) for t in match.convs]
    if shape is None or any(i is None or "lowered_ms" not in i for i in layer_infos):
        return None
    convs = tuple(originals[t] for t in match.convs)
    block = SparseInvertedResidual(convs, tuple(weights[t] for t in match.convs), match.activations, match.residual)
    x = torch.randn(shape)
    with torch.inference_mode():
        ms = median_ms({"block": lambda: block(x)}, reps=reps)["block"]
    layers_ms = sum(i["lowered_ms"] for i in layer_infos)
    decision = {"block_ms": round(ms, 4), "layers_ms": round(layers_ms, 4)}
    if ms >= layers_ms:
        return {"kept": "layers", **decision}
    name = replace_block(gm, match, block.train(convs[0].training))
    for info, macs in zip(layer_infos, block_macs(block, shape)):
        share = info["lowered_ms"] / layers_ms if layers_ms > 0 else 1 / 3
        info.update(backend="block", block=name, lowered_ms=round(ms * share, 4), **macs)
        info["measured_speedup"] = round(info["dense_ms"] / max(info["lowered_ms"], 1e-9), 2)
        info["flop_speedup"] = round(info["dense_macs"] / max(1, info["executed_macs"]), 2)
    return {"kept": "block", "name": name, **decision, "speedup": round(layers_ms / ms, 2) if ms else math.inf}
