"""Structured channel pruning: coupling analysis, importance, ``channel_prune`` and ``shrink``.

Usage (by hand; the recipe names are ``channel_prune`` and ``shrink``)::

    import torch, torchvision
    from sparsifx.tracing import trace
    from sparsifx.pass_manager import run_model
    from sparsifx.passes.channels import ChannelPrune, Shrink, analyze_channels

    x = torch.randn(1, 3, 64, 64)
    gm = trace(torchvision.models.resnet18(), (x,))      # records node.meta["tensor_meta"]
    gm.meta["example_inputs"] = (x,)                     # optional: used by shrink's exactness probe
    ChannelPrune(ratio=0.5, importance="l1", round_to=1)(gm)   # zeroes units; gm.meta["channel_plan"]
    masked = run_model(gm, (x,))
    Shrink()(gm)                                         # physically smaller layers, same outputs
    torch.testing.assert_close(run_model(gm, (x,)), masked)

    recipe = {"stages": [{"pass": "channel_prune", "ratio": 0.5, "ignore": ["fc"]}, {"pass": "shrink"}]}

Both passes work in place. ``channel_prune`` writes ``gm.meta["channel_plan"]`` (a ``ChannelPlan``),
``gm.meta["channel_barriers"]`` (ops whose channels stay whole: ``{"node", "op", "reason"}``) and a line
in ``gm.meta["report_notes"]``; ``shrink`` consumes the plan, re-records shapes and writes
``gm.meta["channel_report"]`` (``removed_units``, ``folded``, ``kept_for_exactness``).

Building blocks (for ``compact`` and tools): ``analyze_channels(gm) -> ChannelAnalysis`` (units, groups,
members, barriers); ``ChannelPlan(analysis, pruned_bool_per_unit)``; ``shrink_with_plan(gm, plan)``;
``zero_units``; registries ``CHANNEL_RULES`` (op -> rule), ``IMPORTANCE``, ``SLICERS``, ``REWRITES``.
"""

from .coupling import ChannelAnalysis, Group, analyze_channels
from .importance import IMPORTANCE
from .prune import ChannelPlan, ChannelPrune, zero_units
from .rewrites import REWRITES
from .rules_base import CHANNEL_RULES, channel_rule
from .shrink import Shrink, shrink_with_plan
from .slicers import SLICERS, register_slicer

__all__ = [
    "CHANNEL_RULES",
    "ChannelAnalysis",
    "ChannelPlan",
    "ChannelPrune",
    "Group",
    "IMPORTANCE",
    "REWRITES",
    "SLICERS",
    "Shrink",
    "analyze_channels",
    "channel_rule",
    "register_slicer",
    "shrink_with_plan",
    "zero_units",
]
