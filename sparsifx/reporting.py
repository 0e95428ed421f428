"""``report(module, example_inputs=None)``: per-layer parameters, non-zeros, sparsity and MACs/FLOPs.

Rows are the modules that own parameters (``recurse=False``: Conv, Linear, norms, Embedding,
MultiheadAttention, ...) plus parameter-free modules that graph ops with a MAC rule ran inside
(e.g. a ``matmul`` in an attention block). Non-zeros of masked layers use
``sparsifx.masking.effective_weight`` (``weight * mask``). Shared parameters count once in the totals.

MACs come from traced shapes: with ``example_inputs`` the module is traced (a copy; a GraphModule
gets fresh shapes recorded in place) and run once; without them, a GraphModule's existing
``node.meta["tensor_meta"]`` is used. Without shapes, MACs/FLOPs are ``None``. FLOPs = 2 x MACs; "sparse MACs"
scale a weight op's MACs by the density of its weight. The rules are the analysis layer's ``COST_RULES``
(``sparsifx.analysis.costs``; ``MAC_RULES`` here is the same table): a module type (qualified name, looked
up along the MRO) or a function/method name -> a rule giving ``(macs, weight)``.
Graph ops without a rule count 0 MACs (elementwise, pooling, reshapes); an opaque leaf or a
function that takes a weight but has no rule is named in ``notes`` as uncounted.

Hook for other passes: put ``gm.meta["report_extra"] = {layer_name: {column: value}}`` and
``gm.meta["report_notes"] = [str, ...]`` on the GraphModule (or pass ``extra=``/``notes=``); the
columns appear in ``str(report)`` after the standard ones and in ``to_dict()["layers"][i]["extra"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .analysis.costs import COST_RULES, OpRule, rule_for, shape_of
from .analysis.costs import param_of as _param_of
from .errors import TraceError
from .masking import effective_weight, is_masked
from .meta_keys import (
    NN_MODULE_STACK,
    OPAQUE_LEAVES,
    REPORT_EXTRA,
    REPORT_NOTES,
    SPARSE_CONTROLLER,
    STORAGE_NOTES,
    TENSOR_META,
)
from .module_utils import preserve_training_flags
from .sparse_linear import is_sparse_storage

# the op cost rules are the analysis layer's (one table for the report and the training accounting)
MacRule = OpRule
MAC_RULES = COST_RULES


@dataclass
class LayerReport:
    """One row: a module's own parameters, their non-zeros and the MACs of the ops it ran."""

    name: str
    type: str
    params: int = 0
    nonzeros: int = 0
    macs: int | None = None
    sparse_macs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def flops(self) -> int | None:
        return None if self.macs is None else 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "params": self.params,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "macs": self.macs,
            "flops": self.flops,
            "sparse_macs": self.sparse_macs,
            "sparse_flops": None if self.sparse_macs is None else 2 * self.sparse_macs,
            "extra": {k: _plain(v) for k, v in self.extra.items()},
        }


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


@dataclass
class Report:
    """Per-layer rows and totals. ``str()`` is an aligned table, ``to_dict()`` JSON-serialisable data."""

    model: str
    layers: list[LayerReport]
    total_params: int
    total_nonzeros: int
    total_macs: int | None
    total_sparse_macs: int | None
    input_shapes: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.total_nonzeros / self.total_params if self.total_params else 0.0

    @property
    def total_flops(self) -> int | None:
        return None if self.total_macs is None else 2 * self.total_macs

    def layer(self, name: str) -> LayerReport:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shapes": self.input_shapes,
            "layers": [row.to_dict() for row in self.layers],
            "totals": {
                "params": self.total_params,
                "nonzeros": self.total_nonzeros,
                "sparsity": self.sparsity,
                "macs": self.total_macs,
                "flops": self.total_flops,
                "sparse_macs": self.total_sparse_macs,
                "sparse_flops": None if self.total_sparse_macs is None else 2 * self.total_sparse_macs,
            },
            "notes": list(self.notes),
        }

    def plot(self, path, before: "Report | None" = None, title: str | None = None, max_layers: int = 60):
        """Write per-layer parameters, density and MACs of this report (and of ``before``, the model before the
        recipe) as a figure; see ``sparsifx.plot``. Needs matplotlib (``pip install sparsifx[plot]``)."""
        from .plot import plot_reports

        return plot_reports(self, path, before=before, title=title, max_layers=max_layers)

    def __str__(self) -> str:
        extra_cols = list(dict.fromkeys(k for row in self.layers for k in row.extra))
        head = ["layer", "type", "params", "nonzeros", "sparsity", "MACs", "FLOPs", "sparse FLOPs", *extra_cols]
        body = [
            [
                r.name,
                r.type,
                _human(r.params),
                _human(r.nonzeros),
                f"{r.sparsity:.1%}",
                _human(r.macs),
                _human(r.flops),
                _human(None if r.sparse_macs is None else 2 * r.sparse_macs),
                *(_cell(r.extra.get(c)) for c in extra_cols),
            ]
            for r in self.layers
        ]
        sparse_flops = None if self.total_sparse_macs is None else 2 * self.total_sparse_macs
        total = [
            "total",
            "",
            _human(self.total_params),
            _human(self.total_nonzeros),
            f"{self.sparsity:.1%}",
            _human(self.total_macs),
            _human(self.total_flops),
            _human(sparse_flops),
            *([""] * len(extra_cols)),
        ]
        widths = [max(len(str(row[i])) for row in [head, total, *body]) for i in range(len(head))]
        left = {0, 1}

        def fmt(row):
            return "  ".join(
                str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            ).rstrip()

        rule = "-" * len(fmt(head))
        shapes = f" on input {self.input_shapes}" if self.input_shapes else ""
        lines = [f"sparsifx report: {self.model}{shapes}", fmt(head), rule, *map(fmt, body), rule, fmt(total)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _human(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _shape_getter(gm: fx.GraphModule) -> Callable[[Any], tuple | None]:
    return shape_of


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any(TENSOR_META in n.meta for n in gm.graph.nodes if n.op == "output")


def _graph_with_shapes(module: nn.Module, example_inputs, notes: list[str]) -> fx.GraphModule | None:
    from .analysis.shapes import record_shapes
    from .tracing import trace

    if example_inputs is None:
        if isinstance(module, fx.GraphModule) and _has_shapes(module):
            return module
        notes.append("no shapes: pass example_inputs (or a GraphModule with tensor_meta) for MACs/FLOPs")
        return None
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    try:
        gm = module if isinstance(module, fx.GraphModule) else trace(module)
        record_shapes(gm, inputs)
    except TraceError as exc:
        notes.append(f"no MACs/FLOPs: {exc}")
        return None
    return gm


def _param_nonzeros(module: nn.Module) -> dict[str, tuple[int, int]]:
    """qualified parameter name -> (numel, non-zeros), masked weights counted as ``weight * mask``, a
    sparse-storage layer's ``values`` as its dense weight (numel out·in; also keyed ``.weight``).
    Every alias of a shared parameter is a key; ``_unique`` keeps one per tensor for the totals."""
    out: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for name, m in module.named_modules(remove_duplicate=False):
            for pname, p in m.named_parameters(recurse=False):
                value = effective_weight(m) if pname == "weight" and is_masked(m) else p
                key = f"{name}.{pname}" if name else pname
                out[key] = (p.numel(), int(torch.count_nonzero(value)))
                if pname == "values" and is_sparse_storage(m):
                    out[key] = out[f"{name}.weight"] = (math.prod(m.shape), out[key][1])
    return out


def _unique(module: nn.Module, nz: dict[str, tuple[int, int]]) -> list[tuple[int, int]]:
    return [nz[name] for name, _ in module.named_parameters()]


def _row(rows: dict[str, LayerReport], name: str, module: nn.Module | None) -> LayerReport:
    if name not in rows:
        rows[name] = LayerReport(name or "(root)", type(module).__name__ if module is not None else "?")
    return rows[name]


def _density(node: fx.Node, weight: Any, nz: dict[str, tuple[int, int]]) -> float:
    key = f"{node.target}.weight" if isinstance(weight, nn.Module) else weight
    if isinstance(key, str) and key in nz:
        numel, nonzero = nz[key]
        return nonzero / numel if numel else 1.0
    return 1.0


def _count_macs(gm: fx.GraphModule, rows: dict[str, LayerReport], nz, notes: list[str]) -> None:
    shape = _shape_getter(gm)
    opaque = set(gm.meta.get(OPAQUE_LEAVES, []))
    for node in gm.graph.nodes:
        rule, module = rule_for(node, gm)
        owner = node.target if node.op == "call_module" else next(reversed(node.meta.get(NN_MODULE_STACK) or {}), "")
        if rule is None:
            _note_uncounted(node, module, opaque, gm, notes)
            continue
        try:
            macs, weight = rule(node, module, shape)
        except (TypeError, IndexError, AttributeError) as exc:  # a shape the rule cannot read
            notes.append(f"MACs of node '{node.name}' not counted: {type(exc).__name__}: {exc}")
            continue
        if not macs and owner not in rows:
            continue
        row = _row(rows, owner, module if module is not None else _safe_submodule(gm, owner))
        row.macs = (row.macs or 0) + int(macs)
        row.sparse_macs = (row.sparse_macs or 0) + int(round(macs * _density(node, weight, nz)))


def _training_notes(meta: dict) -> list[str]:
    """What a sparse-training controller measured: executed FLOPs beside the theoretical ones, state bytes,
    and the layers a ``storage: sparse`` stage left masked."""
    notes = [f"layer '{n}': {why}" for n, why in meta.get(STORAGE_NOTES, {}).items()]
    ctrl = meta.get(SPARSE_CONTROLLER)
    if ctrl is None or not hasattr(ctrl, "training_flops"):
        return notes
    f, b = ctrl.training_flops(), ctrl.state_bytes()
    if f.get("steps"):
        notes.append(
            f"training ({f['steps']} steps): executed FLOPs {_human(f['executed_training_flops'])} = "
            f"{f['executed_flops_ratio']:.3f} of dense; the algorithm's theoretical "
            f"{_human(f['training_flops'])} = {f['flops_ratio']:.3f} (masked layers execute dense)"
        )
    notes.append("training state: " + ", ".join(f"{k} {_human(v)}B" for k, v in b.items()))
    return notes


def _safe_submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name) if name else root
    except AttributeError:
        return None


def _note_uncounted(node: fx.Node, module, opaque: set[str], gm: fx.GraphModule, notes: list[str]) -> None:
    if node.op == "call_module" and any(True for _ in module.parameters()):
        why = "opaque leaf" if node.target in opaque else f"no MAC rule for {type(module).__name__}"
        notes.append(f"MACs of '{node.target}' not counted ({why})")
    elif node.op == "call_function" and any(
        isinstance(_param_of(node, a), torch.Tensor) and _param_of(node, a).dim() > 1 for a in node.args
    ):
        notes.append(
            f"MACs of node '{node.name}' ({getattr(node.target, '__name__', node.target)}) not counted: no MAC rule"
        )


def report(
    module: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    notes: Sequence[str] = (),
) -> Report:
    """Per-layer params, non-zeros, sparsity and (with shapes) MACs/FLOPs of ``module``, plus totals.

    Every submodule's ``training`` flag is as it was afterwards; anything but a module raises ``TraceError``."""
    if not isinstance(module, nn.Module):
        raise TraceError(f"report needs a torch.nn.Module, got {type(module).__name__}")
    with preserve_training_flags(module):
        return _report(module, example_inputs, extra, notes)


def _report(module: nn.Module, example_inputs, extra, notes: Sequence[str]) -> Report:
    all_notes: list[str] = []
    nz = _param_nonzeros(module)
    rows: dict[str, LayerReport] = {}
    for name, m in module.named_modules():
        params = list(m.parameters(recurse=False))
        if params:
            row = _row(rows, name, m)
            counts = [nz[f"{name}.{pn}" if name else pn] for pn, _ in m.named_parameters(recurse=False)]
            row.params = sum(c[0] for c in counts)
            row.nonzeros = sum(c[1] for c in counts)
    gm = _graph_with_shapes(module, example_inputs, all_notes)
    if gm is not None:
        _count_macs(gm, rows, nz, all_notes)
    meta = getattr(module, "meta", {}) if isinstance(module, fx.GraphModule) else {}
    for name, cols in {**meta.get(REPORT_EXTRA, {}), **(extra or {})}.items():
        _row(rows, name, _safe_submodule(module, name)).extra.update(cols)
    all_notes = list(meta.get(REPORT_NOTES, [])) + list(notes) + all_notes + _training_notes(meta)
    has_macs = gm is not None
    unique = _unique(module, nz)
    inputs = None
    if example_inputs is not None:
        seq = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        inputs = [list(x.shape) for x in seq if isinstance(x, torch.Tensor)]
    elif gm is not None:
        inputs = [
            list(n.meta[TENSOR_META].shape)
            for n in gm.graph.nodes
            if n.op == "placeholder" and hasattr(n.meta.get(TENSOR_META), "shape")
        ]
    return Report(
        type(module).__name__,
        list(rows.values()),
        total_params=sum(v[0] for v in unique),
        total_nonzeros=sum(v[1] for v in unique),
        total_macs=sum(r.macs or 0 for r in rows.values()) if has_macs else None,
        total_sparse_macs=sum(r.sparse_macs or 0 for r in rows.values()) if has_macs else None,
        input_shapes=inputs,
        notes=all_notes,
    )
