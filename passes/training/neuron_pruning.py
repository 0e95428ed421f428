"""Hidden-neuron importance pruning (Truly Sparse Neural Networks at Scale,
docs/algorithms.md#neuron-importance-pruning).

A schedule any DST stage can carry (``neuron_pruning: {every_epochs: 10, percentile: 20, after: 200, until: null}``;
absent or null: off). At the end of epoch ``e`` with ``e > after``, ``(e - after) % every_epochs == 0`` and
``e <= until`` (when given), before the method's own epoch-end update, every hidden layer ``l`` — a controlled
Linear whose output reaches the next Linear only through single-input elementwise activations — scores its
output neurons by ``I_j = Σ_i |W_ji|`` (incoming weights), takes ``t = percentile(I, q)`` (numpy's default
``linear`` interpolation: ``torch.quantile(I, q/100, interpolation="linear")``) and removes the neurons with
``I_j <= t`` physically: layer ``l`` loses those output rows and bias entries, the next layer the matching input
columns (both layers shrink in place, so module hooks stay). At least one neuron of a layer is always kept. All
layers are scored before any is cut, so a layer's scores never see the cut of the layer before it. Optimizer
slots and gradients follow the kept entries. The reference only zeroes the incoming weights (and momenta) of such
neurons; removing them also drops their outgoing weights, which equals that model with the outgoing columns zeroed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx import validate
from sparsifx.errors import RecipeError
from sparsifx.masking import is_masked
from sparsifx.sparse_linear import is_sparse_storage

from .mask_ops import remap_slots, swap_param

log = logging.getLogger(__name__)

# single-input elementwise ops a hidden layer's output may pass through on its way to the next Linear
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Identity,
)  # nn.LeakyReLU covers AllReLU
ELEMENTWISE_FUNCTIONS: tuple[Callable, ...] = (
    F.relu,
    torch.relu,
    F.relu_,
    torch.relu_,
    F.leaky_relu,
    F.relu6,
    F.elu,
    F.gelu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.dropout,
)
ELEMENTWISE_METHODS: tuple[str, ...] = ("relu", "relu_", "tanh", "sigmoid")
STALE_META = ("tensor_meta", "val")
OUTPUT_LAYER = "the model's output layer"


@dataclass(frozen=True)
class NeuronPruning:
    """When to prune: ``every_epochs`` (int >= 1, default 10), ``percentile`` q (0 < q < 100, default 20),
    ``after`` (int >= 0, default 200), ``until`` (int >= after, or None: no end)."""

    every_epochs: int = 10
    percentile: float = 20.0
    after: int = 200
    until: int | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str = "neuron_pruning") -> "NeuronPruning | None":
        """``None`` (off), a ``NeuronPruning``, or a mapping of its keys; ``RecipeError`` at ``path.key``."""
        if data is None or isinstance(data, NeuronPruning):
            return data
        validate.mapping(path, data)
        keys = tuple(cls.__dataclass_fields__)
        for key in data:
            if key not in keys:
                raise RecipeError("unknown key", f"{path}.{validate.shown(key)}", allowed=", ".join(keys))
        out = {}
        if "every_epochs" in data:
            out["every_epochs"] = validate.integer(f"{path}.every_epochs", data["every_epochs"], 1)
        if "percentile" in data:
            out["percentile"] = validate.number(
                f"{path}.percentile", data["percentile"], 0.0, 100.0, lo_open=True, hi_open=True
            )
        if "after" in data:
            out["after"] = validate.integer(f"{path}.after", data["after"], 0)
        after = out.get("after", cls.after)
        if data.get("until") is not None:
            out["until"] = validate.integer(f"{path}.until", data["until"], after)
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def due(self, epoch: int) -> bool:
        return (
            epoch > self.after
            and (epoch - self.after) % self.every_epochs == 0
            and (self.until is None or epoch <= self.until)
        )


# --- which layers are hidden ----------------------------------------------------------------------------------
def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_sparse_storage(module)


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def _single_use(gm: fx.GraphModule, name: str) -> str | None:
    """Why module ``name`` cannot be resized in place (called more than once, read by attribute), or None."""
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    if calls != 1:
        return f"'{name}' is called {calls} times"
    if any(n.op == "get_attr" and str(n.target).startswith(name + ".") for n in gm.graph.nodes):
        return f"'{name}' is read by attribute"
    return None


def _consumer(gm: fx.GraphModule, name: str) -> tuple[str | None, list[fx.Node], str]:
    """(the Linear that layer ``name`` feeds, the nodes whose feature count changes, why not when None)."""
    module = gm.get_submodule(name)
    if not _linear_like(module):
        return None, [], f"a {type(module).__name__}, not a Linear"
    why = _single_use(gm, name)
    if why:
        return None, [], why
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    chain = [node]
    while True:
        users = list(chain[-1].users)
        if len(users) != 1:
            return None, [], f"output of '{chain[-1].name}' has {len(users)} users"
        user = users[0]
        if user.op == "output":
            return None, [], OUTPUT_LAYER
        if user.all_input_nodes != [chain[-1]] or not user.args or user.args[0] is not chain[-1]:
            return None, [], f"'{user.name}' takes other tensors too"
        if user.op == "call_module" and _linear_like(gm.get_submodule(user.target)):
            why = _single_use(gm, user.target)
            return (None, [], why) if why else (user.target, chain, "")
        if not _elementwise(gm, user):
            return (
                None,
                [],
                f"output reaches '{user.name}' ({user.op} {user.target}), not a Linear through elementwise activations",
            )
        chain.append(user)


def hidden_layers(ctrl) -> tuple[dict[str, tuple[str, list[fx.Node]]], dict[str, str]]:
    """``({layer: (consumer, changed nodes)}, {skipped layer: why})`` over the controlled layers."""
    pairs, skipped = {}, {}
    for name in ctrl.names:
        consumer, chain, why = _consumer(ctrl.gm, name)
        if consumer is None:
            skipped[name] = why
        else:
            pairs[name] = (consumer, chain)
    return pairs, skipped


# --- scores and plans --------------------------------------------------------------------------------------------
@torch.no_grad()
def importance(module: nn.Module) -> torch.Tensor:
    """``I_j = Σ_i |W_ji|`` per output neuron ``j`` (float64; masked weights count as stored: ``W ⊙ M``)."""
    if is_sparse_storage(module):
        scores = torch.zeros(module.out_features, dtype=torch.float64, device=module.values.device)
        return scores.index_add_(0, module.rows().to(scores.device), module.values.detach().abs().double())
    w = module.weight.detach()
    if is_masked(module):
        w = w * module.mask
    return w.abs().double().sum(1)


def kept_neurons(scores: torch.Tensor, percentile: float) -> tuple[torch.Tensor, float]:
    """(bool keep per neuron, threshold ``t``): neurons with ``score <= t`` go, the best one stays if all would."""
    t = torch.quantile(scores, percentile / 100.0, interpolation="linear")
    keep = scores > t
    if not keep.any():
        keep[scores.argmax()] = True
    return keep, float(t)


# --- physical removal -------------------------------------------------------------------------------------------
@torch.no_grad()
def _replace_param(optimizer, module: nn.Module, attr: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace parameter ``attr`` of ``module`` by ``fn(old)``; its gradient and optimizer slots go through ``fn``
    too (slots shaped like the parameter; scalars such as Adam's ``step`` are kept)."""
    old = getattr(module, attr)
    new = nn.Parameter(fn(old.detach()).clone(), requires_grad=old.requires_grad)
    if optimizer is not None and old in optimizer.state:
        state = optimizer.state[old]
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == old.shape:
                state[key] = fn(value).clone()
    grad = None if old.grad is None else fn(old.grad).clone()
    setattr(module, attr, new)
    swap_param(optimizer, old, new)
    new.grad = grad


def _cut(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        t = t[rows.to(t.device)]
    if cols is not None:
        t = t[:, cols.to(t.device)]
    return t.contiguous()


@torch.no_grad()
def _shrink_sparse(optimizer, module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    dev = module.values.device
    r, c = module.rows().to(dev), module.col.long().to(dev)
    keep = torch.ones(r.numel(), dtype=torch.bool, device=dev)
    out_f, in_f = module.out_features, module.in_features
    if rows is not None:
        rows = rows.to(dev)
        keep &= rows[r]
        r, out_f = torch.cumsum(rows.long(), 0)[r] - 1, int(rows.sum())
    if cols is not None:
        cols = cols.to(dev)
        keep &= cols[c]
        c, in_f = torch.cumsum(cols.long(), 0)[c] - 1, int(cols.sum())
    source = keep.nonzero().squeeze(1)
    keys = r[source] * in_f + c[source]  # row-major order survives monotone renumbering: still sorted
    values = module.values.detach()[source].clone()
    grad = None if module.values.grad is None else module.values.grad[source].clone()
    remap_slots(optimizer, module.values, source)
    module.values.grad = None
    old = module.values
    module.out_features, module.in_features = out_f, in_f
    module.probe.clear()
    module.set_topology(keys, values)
    swap_param(optimizer, old, module.values)
    module.values.grad = grad
    if rows is not None and module.bias is not None:
        _replace_param(optimizer, module, "bias", lambda t: t[rows.to(t.device)].contiguous())


@torch.no_grad()
def shrink_linear(
    optimizer, module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> None:
    """Keep output neurons ``rows`` and inputs ``cols`` (bool masks; None: all) of a Linear, MaskedLinear or
    SparseLinear, in place; ``optimizer``'s slots and the gradients follow."""
    if is_sparse_storage(module):
        _shrink_sparse(optimizer, module, rows, cols)
        return
    _replace_param(optimizer, module, "weight", lambda t: _cut(t, rows, cols))
    if is_masked(module):
        module.mask = _cut(module.mask, rows, cols)
    if rows is not None and module.bias is not None:
        _replace_param(optimizer, module, "bias", lambda t: _cut(t, rows, None))
    module.out_features, module.in_features = module.weight.shape


@torch.no_grad()
def prune_neurons(ctrl, percentile: float) -> list[dict[str, Any]]:
    """Score every hidden layer, then remove its neurons with ``I <= percentile(I, q)`` (module docstring);
    returns the history records added."""
    pairs, skipped = hidden_layers(ctrl)
    for name, why in skipped.items():
        log.log(
            logging.DEBUG if why == OUTPUT_LAYER else logging.INFO, "neuron pruning skips layer '%s': %s", name, why
        )
    plans = {name: kept_neurons(importance(ctrl.gm.get_submodule(name)), percentile) for name in pairs}
    rows = {name: keep for name, (keep, _) in plans.items()}
    cols = {pairs[name][0]: keep for name, keep in rows.items()}
    for name in dict.fromkeys([*rows, *cols]):
        shrink_linear(ctrl.optimizer, ctrl.gm.get_submodule(name), rows.get(name), cols.get(name))
    records = []
    for name, (keep, t) in plans.items():
        for node in pairs[name][1]:
            for key in STALE_META:
                node.meta.pop(key, None)
        records.append(
            {
                "step": ctrl.step,
                "layer": name,
                "kind": "neuron_pruning",
                "removed": int((~keep).sum()),
                "out_features": int(keep.sum()),
                "threshold": t,
                "nnz": ctrl.nnz()[name],
            }
        )
    ctrl.history.extend(records)
    log.info("neuron pruning at step %d: %s", ctrl.step, {r["layer"]: r["removed"] for r in records})
    return records


def maybe_prune(ctrl, epoch: int) -> list[dict[str, Any]]:
    """Run ``prune_neurons`` when the method's ``neuron_pruning`` schedule is due at the end of ``epoch``."""
    schedule = getattr(ctrl.method, "neuron_pruning", None)
    if schedule is None or not schedule.due(epoch):
        return []
    return prune_neurons(ctrl, schedule.percentile)
