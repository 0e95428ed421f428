"""``channel_prune(streams=...)``: whether channels that a normalisation's statistics span may be pruned.

``exact`` (default): LayerNorm / RMSNorm (modules, ``F.layer_norm`` / ``F.rms_norm`` and traced-into forms such as
HF's ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w``) are barriers: removing a channel they
normalise changes the statistics of every kept one. So a transformer's residual stream (embedding dim, every
residual add and norm, the q/k/v/MLP input dims, the o/MLP output dims, the head's input dim) stays whole.

``approximate``: those norms pass their channels; their weight and bias are zeroed and sliced with them, and
a keepdim mean/var/std over the channels that is broadcast back onto them (``rules_shape.statistic``) passes
too. Each is recorded in ``Tracker.approximations`` (not a barrier); any other reduction across channels stays a
barrier. The residual stream then becomes one coupled group, pruned at the requested ratio by the usual
importance summed over its members. Model outputs stay whole (``containers.protect_outputs``).

Such a prune is not exact: the shrunk model is not the masked one (the statistics are over fewer channels),
so the pass manager's ``verify`` comparison of ``shrink`` is skipped, explicitly (``Shrink.exactness_waived``,
logged and recorded in the history). Instead the deviation is measured on the example inputs (else a random
draw): ``StreamsReport`` in ``gm.meta["channel_outcome"].streams`` after ``channel_prune`` and in
``gm.meta["channel_report"]["streams"]`` after ``shrink``, each time with a warning to fine-tune.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx

from sparsifx.meta_keys import EXAMPLE_INPUTS
from sparsifx.pass_manager import run_model

from . import rules_modules as rm
from .coupling import ChannelAnalysis, model_inputs
from .rules_base import RuleContext
from .tracker import tensor_leaves
from .zeros import ZERO_RULES

log = logging.getLogger(__name__)

STREAMS = ("exact", "approximate")
WAIVED = (
    "skipped: approximate streams (normalisation statistics span pruned channels, so the shrunk model "
    "differs from the masked one); see the measured deviation"
)


@dataclass
class StreamsReport:
    """What an approximate prune did and what it cost on ``inputs`` (relative L2 deviations of the outputs).

    ``approximations``: ``{"node", "op", "reason"}`` of each approximated normalisation that a pruned unit
    passes; ``units``: pruned channel units in approximate groups; ``deviation_masked``: masked model vs the
    original (after ``channel_prune``); ``deviation``: shrunk vs original and ``deviation_approximation``: shrunk
    vs masked, the approximation alone (after ``shrink``); ``exactness_check``: what became of the shrunk ==
    masked check."""

    approximations: list[dict]
    units: int
    inputs_kind: str
    deviation_masked: float | None = None
    deviation: float | None = None
    deviation_approximation: float | None = None
    exactness_check: str = WAIVED
    inputs: tuple = field(default=(), repr=False)
    reference: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "streams": "approximate",
            "approximations": [dict(a) for a in self.approximations],
            "units": self.units,
            "inputs": self.inputs_kind,
            "deviation_masked": self.deviation_masked,
            "deviation": self.deviation,
            "deviation_approximation": self.deviation_approximation,
            "exactness_check": self.exactness_check,
        }

    def after_prune(self, gm: fx.GraphModule, notes: list[str]) -> None:
        """Measure the masked model against the original; note and warn."""
        self.deviation_masked = relative_deviation(run_model(gm, self.inputs), self.reference)
        text = (
            f"approximate streams: {self.units} channel units pruned through {len(self.approximations)} "
            f"normalisations; masked output deviation {self.deviation_masked:.3g} (relative L2, "
            f"{self.inputs_kind})"
        )
        notes.append(text)
        log.warning("channel_prune %s; fine-tune the pruned model afterwards", text)

    def after_shrink(self, gm: fx.GraphModule, masked: Any) -> None:
        """Measure the shrunk model against the original and the masked one; warn."""
        shrunk = run_model(gm, self.inputs)
        self.deviation = relative_deviation(shrunk, self.reference)
        self.deviation_approximation = relative_deviation(shrunk, masked)
        log.warning(
            "shrink: approximate streams (%d channel units through %d normalisations): output deviation "
            "%.3g from the original, %.3g from the masked model (relative L2, %s); the exactness check was "
            "skipped; fine-tune the pruned model afterwards",
            self.units,
            len(self.approximations),
            self.deviation,
            self.deviation_approximation,
            self.inputs_kind,
        )


def approximated_units(a: ChannelAnalysis) -> list[tuple[dict, np.ndarray]]:
    """Each recorded approximation with the prunable units whose channels pass it."""
    out = []
    for rec in a.tracker.approximations:
        units = np.unique(a.unit[rec["atoms"].numpy()])
        out.append((rec, units[a.prunable[units]]))
    return out


def begin(gm: fx.GraphModule, a: ChannelAnalysis, pruned: np.ndarray, seed: int) -> StreamsReport | None:
    """Before zeroing: if ``pruned`` takes units through approximations, run the original model once and
    return the report to complete; else ``None`` (the prune is exact)."""
    hit = [(rec, units[pruned[units]]) for rec, units in approximated_units(a)]
    hit = [(rec, units) for rec, units in hit if len(units)]
    if not hit:
        return None
    inputs = model_inputs(gm, seed)[0]
    kind = "example inputs" if gm.meta.get(EXAMPLE_INPUTS) is not None else "a random input draw"
    units = int(len(np.unique(np.concatenate([u for _, u in hit]))))
    shown = [{k: rec[k] for k in ("node", "op", "reason")} for rec, _ in hit]
    return StreamsReport(shown, units, kind, inputs=tuple(inputs), reference=run_model(gm, inputs))


def relative_deviation(actual: Any, reference: Any) -> float:
    """``||actual - reference|| / ||reference||`` over every floating-point output tensor (nested containers
    and model output classes flattened in order)."""
    a = [t for t in tensor_leaves(_plain(actual)) if t.is_floating_point()]
    r = [t for t in tensor_leaves(_plain(reference)) if t.is_floating_point()]
    if len(a) != len(r) or any(x.shape != y.shape for x, y in zip(a, r)) or not r:
        return float("nan")
    diff = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, r))
    norm = sum(float(y.double().square().sum()) for y in r)
    return (diff / norm) ** 0.5 if norm > 0 else float("inf") if diff > 0 else 0.0


def _plain(value: Any) -> Any:
    return value.to_tuple() if hasattr(value, "to_tuple") else value


def _approximated(cx: RuleContext, node: fx.Node) -> bool:
    return any(rec["node"] == node.name for rec in cx.t.approximations)


def _zero_norm_fn(affine: tuple[str, ...]):
    """An approximated ``F.layer_norm``/``F.rms_norm`` is zero at pruned channels when its (zeroed) weight and
    bias (if any) are."""

    def zero_after(zero: set[str], cx: RuleContext, node: fx.Node) -> bool:
        args = [node.args[i] if i < len(node.args) else node.kwargs.get(k) for i, k in enumerate(affine, start=2)]
        return (
            _approximated(cx, node)
            and args[0] is not None
            and all(x is None or (isinstance(x, fx.Node) and x.name in zero) for x in args)
        )

    return zero_after


# an approximated norm module has an affine weight (zeroed, with its bias): its pruned channels are zero
ZERO_RULES[rm.layer_norm] = ZERO_RULES[rm.rms_norm] = lambda z, cx, n: _approximated(cx, n)
ZERO_RULES[rm.layer_norm_fn] = _zero_norm_fn(("weight", "bias"))
ZERO_RULES[rm.rms_norm_fn] = _zero_norm_fn(("weight",))
