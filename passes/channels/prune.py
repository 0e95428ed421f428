"""Pass ``channel_prune``: score coupled channel units, zero the least important ones (a masked model)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from sparsifx import validate
from sparsifx.errors import RecipeError
from sparsifx.masking import is_masked
from sparsifx.meta_keys import CHANNEL_BARRIERS, CHANNEL_OUTCOME, CHANNEL_PLAN, REPORT_NOTES
from sparsifx.module_classes import class_name, is_container
from sparsifx.module_utils import submodule
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection

from .coupling import ChannelAnalysis, Group, analyze_channels
from .decompose import decompose_attention, has_attention
from .heads import ATTENTION_MODES, head_units, prune_heads_then_dims
from .importance import IMPORTANCE, member_tensor
from .outcome import ChannelShortfallError, PruneOutcome, prune_outcome
from .streams import STREAMS, StreamsReport
from .streams import begin as begin_streams

log = logging.getLogger(__name__)

DEFAULT_TYPES = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Linear",
    "Embedding",
    "Conv1D",
)  # Conv1D: transformers' (GPT-2) transposed Linear


@dataclass
class ChannelPlan:
    """What ``shrink`` removes: ``pruned[unit]`` over ``analysis`` of the graph with ``analysis.signature``."""

    analysis: ChannelAnalysis
    pruned: np.ndarray
    notes: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)  # (owner, tensor) -> (id, _version) right after zeroing
    streams: StreamsReport | None = None  # set when pruned units pass approximated normalisations

    def untouched(self, gm: fx.GraphModule) -> bool:
        """Whether no zeroed tensor was modified in place (e.g. by an optimizer) since ``channel_prune``."""
        if not self.versions:
            return False
        for (owner, tensor), (ident, version) in self.versions.items():
            t = getattr(submodule(gm, owner) if owner else gm, tensor, None)
            if t is None or id(t) != ident or t._version != version:
                return False
        return True


@register_pass("channel_prune")
class ChannelPrune(PassBase):
    """``conv(x)[:, c] -> 0`` for the least important coupled channel units of every group.

    Parameters: ``ratio`` (fraction of units pruned per group; per layer via ``by_name``/``by_type``/
    ``by_pattern``: a group uses the smallest ratio of its producer layers), ``importance`` (a name in
    ``IMPORTANCE``), ``round_to`` (kept units per group rounded up to a multiple), ``conv_groups`` (for a
    grouped conv with in == out channels: ``"keep"`` prunes the same number of channels inside every conv
    group; ``"prune"`` removes whole conv groups of least total importance and keeps the group width, so
    vectorised grouped kernels (onnxruntime's NCHWc blocks of 8 or 16 channels) still apply; a group
    structure that whole-group pruning cannot keep even falls back to ``"keep"`` with a note), ``seed`` (``random``),
    ``batch`` / ``loss_fn`` (``taylor``), selection keys ``types``/``ignore`` (a group is pruned only when
    all its producer layers are selected). At least one unit is kept per group; model inputs and
    outputs are never pruned. Zeroes producer rows, biases, norm affine params and parameters added to
    the channels; records ``gm.meta["channel_plan"]`` for ``shrink``. Plain ``nn.MultiheadAttention`` calls
    are first rewritten into linear projections + ``scaled_dot_product_attention`` (``decompose.py``), and
    torchvision Swin's fused window attention into graph ops (``window_attention.py``), so that their heads prune.
    ``attention``: ``"head_dims"`` (default) prunes within-head dims, uniformly across the heads; ``"heads"``
    prunes whole heads (q/k/v rows, o columns, per-head bias columns; a key/value head of grouped-query attention
    goes with all its query heads); ``"both"`` prunes whole heads, removes them, then within-head dims
    (``heads.py``; not with ``min_achieved_ratio``).

    Shortfall: *achieved* is the fraction of removed channels among the output channels of the selected
    conv/linear/embedding layers with a ratio > 0, model outputs excluded (``PruneOutcome``); barriers,
    rounding and kept units count against it. ``gm.meta["channel_outcome"]`` holds it and
    ``gm.meta["channel_barriers"]`` gives each barrier's ``channels`` held whole. When achieved falls more than
    ``SHORTFALL_TOLERANCE`` (0.1) below the requested mean ratio, a warning (logging) and a report note name
    the top barriers; ``min_achieved_ratio`` (``None``: off) makes achieved below it a ``ChannelShortfallError``
    raised before anything is zeroed.

    ``streams``: ``"exact"`` (default) keeps channels that LayerNorm/RMSNorm statistics span whole (barriers);
    ``"approximate"`` prunes them too (the transformer residual stream), recording each such norm as an
    approximation and measuring the output deviation it causes (``streams.py``; fine-tune afterwards).
    """

    in_place = True
    requires_analyses = ("shapes",)
    layer_params = ("ratio",)
    _stage = None  # attention="both": one stage's group ratios (heads.py)

    def __init__(
        self,
        *,
        ratio: float = 0.5,
        importance: str = "l1",
        round_to: int = 1,
        conv_groups: str = "keep",
        seed: int = 0,
        selection: LayerSelection | None = None,
        batch: Sequence[Any] | None = None,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
        min_achieved_ratio: float | None = None,
        streams: str = "exact",
        attention: str = "head_dims",
    ):
        self.ratio = validate.number("ratio", ratio, 0.0, 1.0, hi_open=True)
        self.importance = validate.choice("importance", importance, IMPORTANCE.names())
        self.round_to = validate.integer("round_to", round_to, 1)
        self.conv_groups = validate.choice("conv_groups", conv_groups, ("keep", "prune"))
        self.seed = validate.integer("seed", seed)
        self.selection = (selection or LayerSelection()).with_defaults(DEFAULT_TYPES).with_traced_into()
        self.batch, self.loss_fn = batch, loss_fn
        self.min_achieved_ratio = (
            None if min_achieved_ratio is None else validate.number("min_achieved_ratio", min_achieved_ratio, 0.0, 1.0)
        )
        self.streams = validate.choice("streams", streams, STREAMS)
        self.attention = validate.choice("attention", attention, ATTENTION_MODES)
        if self.attention == "both" and self.min_achieved_ratio is not None:
            raise RecipeError(
                "is not supported with attention 'both'",
                "min_achieved_ratio",
                validate.shown(min_achieved_ratio),
                "null, or attention 'heads' / 'head_dims'",
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.attention == "both" and self._stage is None:
            return prune_heads_then_dims(self, gm)
        heads = self.attention == "heads"
        rewritten = decompose_attention(gm, heads) if self.ratio > 0 and has_attention(gm) else 0
        with head_units(gm, heads):
            analysis = analyze_channels(gm, streams=self.streams)
        scores = IMPORTANCE.get(self.importance)(gm, analysis, self)
        pruned = np.zeros(len(analysis.prunable), dtype=bool)
        notes: list[str] = []
        selected = dict(self.selection.layers(gm))
        ratios = {
            name: self._layer_ratio(gm, name, selected[name])
            for name in analysis.tracker.module_atoms
            if name in selected
        }
        notes.extend(_idle_containers(gm, selected, analysis))
        for group in analysis.groups:
            ratio = self._group_ratio(group, ratios)
            ratio = self._stage(analysis, group, ratio) if self._stage and ratio else ratio
            if ratio:
                self._select(analysis, group, scores, ratio, pruned, notes)
        _keep_every_member(analysis, pruned, scores)
        for group in analysis.groups:
            if pruned[group.units].any() and not _constraints_hold(analysis, group.units, pruned):
                pruned[group.units] = False
                notes.append(f"group of {group.modules[0]} left whole: grouped conv would be unbalanced")
        outcome, held = prune_outcome(gm, analysis, pruned, ratios)
        if self._stage is None:
            self._judge(outcome, notes)
        streams = begin_streams(gm, analysis, pruned, self.seed)  # runs the original model if approximate
        modified = zero_units(gm, analysis, pruned) or bool(rewritten)
        if streams is not None:
            streams.after_prune(gm, notes)
            outcome.streams = streams.to_dict()
        plan = ChannelPlan(analysis, pruned, notes, _versions(gm, analysis), streams)
        gm.meta[CHANNEL_PLAN] = plan
        gm.meta[CHANNEL_BARRIERS] = [{**b, "channels": held.get(b["node"], 0)} for b in analysis.barriers]
        gm.meta[CHANNEL_OUTCOME] = outcome
        gm.meta.setdefault(REPORT_NOTES, []).append(
            f"channel_prune: pruned {int(pruned.sum())} of {int(analysis.prunable.sum())} channel units in "
            f"{len(analysis.groups)} groups; {len(analysis.barriers)} barrier ops" + "".join(f"; {n}" for n in notes)
        )
        return PassResult(gm, modified)

    def _judge(self, outcome: PruneOutcome, notes: list[str]) -> None:
        """Raise ``ChannelShortfallError`` below ``min_achieved_ratio``; warn and note a shortfall."""
        if self.min_achieved_ratio is not None and outcome.channels and outcome.achieved < self.min_achieved_ratio:
            raise ChannelShortfallError(
                f"channel_prune {outcome.describe()}: below min_achieved_ratio {self.min_achieved_ratio}", outcome
            )
        if outcome.shortfall:
            log.warning("channel_prune pruned little: %s", outcome.describe())
            notes.append(f"pruned little: {outcome.describe()}")

    def _layer_ratio(self, gm: fx.GraphModule, name: str, module: torch.nn.Module) -> float:
        return validate.number(
            f"by_name.{name}.ratio",
            self.selection.param(name, module, "ratio", self.ratio, root=gm),
            0.0,
            1.0,
            hi_open=True,
        )

    def _group_ratio(self, group: Group, ratios: dict[str, float]) -> float | None:
        if any(name not in ratios for name in group.modules):
            return None
        return min(ratios[name] for name in group.modules) if group.modules else None

    def _select(
        self, a: ChannelAnalysis, group: Group, scores: np.ndarray, ratio: float, pruned: np.ndarray, notes: list[str]
    ) -> None:
        units = group.units
        n = len(units)
        keep = n - int(math.floor(ratio * n + 1e-9))
        keep = min(n, max(1, int(math.ceil(keep / self.round_to)) * self.round_to))
        if keep >= n:
            return
        blocks = _block_keys(a, units)
        if self.conv_groups == "prune" and any(blocks):
            trial = pruned.copy()
            trial[_whole_blocks(blocks, scores, keep, n)] = True
            if _constraints_hold(a, units, trial):
                pruned[:] = trial
                return
            notes.append(
                f"group of {group.modules[0]}: whole conv groups cannot be pruned evenly; "
                "pruned inside every conv group"
            )
        trial = pruned.copy()
        trial[_within_blocks(blocks, scores, keep, n)] = True
        if not _constraints_hold(a, units, trial):
            notes.append(f"group of {group.modules[0]} left whole: group structure cannot be kept balanced")
            return
        pruned[:] = trial


def _idle_containers(gm: fx.GraphModule, selected: dict, analysis: ChannelAnalysis) -> list[str]:
    """Notes for selected containers of traced-into layers (``sparsifx.module_classes``) that produce no
    channels: no functional layer rule reads their weight, so they are left whole."""
    idle = [
        name
        for name, module in selected.items()
        if name not in analysis.tracker.module_atoms and is_container(gm, name, module)
    ]
    if not idle:
        return []
    log.info(
        "channel_prune: traced-into layers %s produce no channels through a functional layer rule; left whole", idle
    )
    shown = ", ".join(f"{n} ({class_name(gm, n, selected[n])})" for n in idle[:5])
    more = f" and {len(idle) - 5} more" if len(idle) > 5 else ""
    return [f"traced-into layers left whole (their weights feed no functional layer rule): {shown}{more}"]


def _within_blocks(blocks: dict[tuple, np.ndarray], scores: np.ndarray, keep: int, n: int) -> list[int]:
    """The least important units of every block, keeping ``keep / n`` of each."""
    chosen: list[int] = []
    for key_units in blocks.values():
        k = max(1, int(round(keep * len(key_units) / n)))
        order = np.argsort(scores[key_units], kind="stable")
        chosen.extend(key_units[order[: len(key_units) - k]].tolist())
    return chosen


def _whole_blocks(blocks: dict[tuple, np.ndarray], scores: np.ndarray, keep: int, n: int) -> list[int]:
    """Whole blocks of least total importance, keeping about ``keep / n`` of the blocked units (at least
    one block); units in no block (key ``()``) are chosen one by one."""
    free = blocks.get((), np.zeros(0, dtype=np.int64))
    chosen = _within_blocks({(): free}, scores, keep, n) if len(free) else []
    keyed = [u for k, u in blocks.items() if k]
    drop = min(len(keyed) - 1, int(round(len(keyed) * (1 - keep / n))))
    if drop <= 0:
        return chosen
    order = np.argsort([float(scores[u].sum()) for u in keyed], kind="stable")
    for i in order[:drop].tolist():
        chosen.extend(keyed[i].tolist())
    return chosen


def _touching(a: ChannelAnalysis, units: np.ndarray):
    """The constraints (unit ids per position, blocks) that involve any of ``units``."""
    index = a.constraints_of_unit
    for i in sorted({i for u in units.tolist() for i in index.get(u, ())}):
        yield a.constraint_units[i]


def _block_keys(a: ChannelAnalysis, units: np.ndarray) -> dict[tuple, np.ndarray]:
    """Units keyed by their block in every grouped-conv constraint touching the group."""
    keys: dict[int, tuple] = {int(u): () for u in units}
    for cu, blocks, _ in _touching(a, units):
        size, seen = len(cu) // blocks, set()
        for pos, u in enumerate(cu.tolist()):
            if u in keys and u not in seen:
                seen.add(u)
                keys[u] = keys[u] + (pos // size,)
    out: dict[tuple, list[int]] = {}
    for u, k in keys.items():
        out.setdefault(k, []).append(u)
    return {k: np.array(v) for k, v in out.items()}


def _keep_every_member(a: ChannelAnalysis, pruned: np.ndarray, scores: np.ndarray) -> None:
    """No tensor dim may lose all its channels: keep the best unit of any member that would."""
    for m in a.members:
        units = a.unit[m.atoms.numpy()]
        if len(units) and pruned[units].all():
            pruned[units[np.argmax(scores[units])]] = False


def _constraints_hold(a: ChannelAnalysis, units: np.ndarray, pruned: np.ndarray) -> bool:
    for cu, blocks, droppable in _touching(a, units):
        kept = (~pruned[cu]).reshape(blocks, -1).sum(1)
        if droppable:
            kept = kept[kept > 0]
        if len(set(kept.tolist())) > 1:
            return False
    return True


def _versions(gm: fx.GraphModule, a: ChannelAnalysis) -> dict:
    out = {}
    for m in a.members:
        if m.role == "out":
            t = member_tensor(gm, m)
            out[(m.owner, m.tensor)] = (id(t), t._version)
    return out


def zero_units(gm: fx.GraphModule, a: ChannelAnalysis, pruned: np.ndarray) -> bool:
    """Zero the ``out`` members of pruned units (and masks of masked layers); True if any value changed."""
    changed = False
    with torch.no_grad():
        for m in a.members:
            if m.role != "out":
                continue
            idx = np.nonzero(pruned[a.unit[m.atoms.numpy()]])[0]
            if not len(idx):
                continue
            index = torch.as_tensor(idx, dtype=torch.long)
            t = member_tensor(gm, m)
            changed = changed or bool(t.index_select(m.dim, index).any())
            t.index_fill_(m.dim, index, 0)
            owner = submodule(gm, m.owner) if m.owner else gm
            if m.tensor == "weight" and is_masked(owner):
                owner.mask.index_fill_(m.dim, index, 0)
    return changed
