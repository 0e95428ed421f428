"""CTRE's activation statistics: cosine similarity between the two neurons a missing connection would join.

For a Linear layer with input ``A_in (N×n_in)`` and post-activation output ``A_out (N×n_out)``, accumulated
over batches without storing them: ``G = A_outᵀ A_in``, ``q_in = Σ A_in²``, ``q_out = Σ A_out²``; then
``S = |G| / (sqrt(q_out) sqrt(q_in)ᵀ)`` (0 where a column is all zero), shaped like the weight
(docs/algorithms.md#ctre). Conv2d (groups=1) is treated as a Linear over unfolded input patches (departure:
CTRE is defined for MLPs; this is its natural extension). The post-activation is found in the graph: the
layer's single user when it is a registered activation, softmax when the layer feeds the graph output (as
CTRE's output layer), else the raw output. Under DDP the sums are all-reduced before ``S`` is formed.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.errors import UnsupportedOpError
from sparsifx.registry import Registry

from .distributed import all_reduce_sum

ACTIVATIONS: Registry = Registry("activation")
for _name, _fn in (
    ("relu", F.relu),
    ("sigmoid", torch.sigmoid),
    ("tanh", torch.tanh),
    ("gelu", F.gelu),
    ("silu", F.silu),
    ("elu", F.elu),
    ("leaky_relu", F.leaky_relu),
    ("relu6", F.relu6),
):
    ACTIVATIONS.register(_name, _fn)


def _activation_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__.lower()
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", node.target) if node.op == "call_function" else node.target
    return None


def post_activation(gm: fx.GraphModule, layer: str):
    """The function applied to ``layer``'s output in the graph (see module docstring)."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer), None)
    users = list(node.users) if node is not None else []
    if any(u.op == "output" for u in users):
        return lambda y: torch.softmax(y, dim=1)
    if len(users) == 1:
        name = _activation_name(gm, users[0])
        if name == "leakyrelu":
            slope = gm.get_submodule(users[0].target).negative_slope
            return lambda y: F.leaky_relu(y, slope)
        if isinstance(name, str) and name in ACTIVATIONS:
            return ACTIVATIONS.get(name)
    return lambda y: y


def _columns(module: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if isinstance(module, nn.Conv2d) and module.groups == 1 and isinstance(module.padding, tuple):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    raise UnsupportedOpError(
        "CTRE's cosine growth supports Linear and Conv2d (groups=1, explicit padding)", module=name
    )


class CosineStats:
    """Streaming sums for the cosine scores of a set of layers."""

    def __init__(self, gm: fx.GraphModule, names: list[str], charge=None):
        """``charge(flops)`` is told the cost of every statistics product (``2·N·n_in·n_out`` per layer and batch:
        as much as a dense weight gradient), so that the training FLOPs count it."""
        self.gm, self.names, self.charge = gm, list(names), charge
        self.act = {n: post_activation(gm, n) for n in self.names}
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.handles: list = []
        self.enabled = lambda module: True

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not self.enabled(module):
                return
            with torch.no_grad():
                a_in, a_out = _columns(
                    module, inputs[0].detach().float(), self.act[name](output.detach().float()), name
                )
                g = a_out.t() @ a_in
                if self.charge is not None:
                    self.charge(2.0 * a_in.shape[0] * a_in.shape[1] * a_out.shape[1])
                q_in, q_out = (a_in * a_in).sum(0), (a_out * a_out).sum(0)
                if name in self.sums:
                    for acc, new in zip(self.sums[name], (g, q_in, q_out)):
                        acc.add_(new)
                else:
                    self.sums[name] = [g, q_in, q_out]

        return hook

    def install(self) -> "CosineStats":
        self.remove()
        self.handles = [self.gm.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def reset(self) -> None:
        self.sums = {}

    def scores(self) -> dict[str, torch.Tensor]:
        """``S`` per layer (weight-shaped, in [0, 1]); all-reduced across ranks first."""
        out = {}
        for name in self.names:
            if name not in self.sums:
                continue
            g, q_in, q_out = (all_reduce_sum(t) for t in self.sums[name])
            denom = q_out.sqrt()[:, None] * q_in.sqrt()[None, :]
            s = torch.where(denom > 0, g.abs() / denom.clamp_min(1e-30), torch.zeros_like(g)).clamp_(0.0, 1.0)
            out[name] = s.reshape(self.gm.get_submodule(name).weight.shape)
        return out
