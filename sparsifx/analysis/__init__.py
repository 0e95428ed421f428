"""The analysis layer: analyses read a GraphModule (and may run its example inputs) and write ``node.meta`` /
``gm.meta`` (keys in ``sparsifx.meta_keys``); they never modify the graph.

Registered in ``sparsifx.registry.ANALYSES`` by name:

* ``shapes`` (``shapes.py``): ``node.meta["tensor_meta"]``, from one run of the example inputs;
* ``macs`` (``costs.py``): ``node.meta["macs"]``, the MACs of every op with a cost rule. ``COST_RULES`` is the
  one table of op cost rules; the report (``sparsifx.report``) and the training accounting
  (``sparsifx.accounting``, ``sparsifx.passes.training.flops``) both use it;
* ``channel_coupling`` (``sparsifx.passes.channels.coupling``, registered when the channel passes load):
  ``gm.meta["channel_analysis"]``, the coupled channel groups.

A pass declares what it needs: ``requires_analyses`` (the pass manager runs each before the pass unless its
result is still valid; one it cannot provide, e.g. ``shapes`` without example inputs, raises
``PreconditionError``) and ``uses_analyses`` (provided when possible; the pass checks what it reads). Example
inputs come from the manager or ``gm.meta["example_inputs"]``. A pass called directly (``pass_(gm)``) runs the
declared analyses whose results are missing when ``gm.meta["example_inputs"]`` is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from ..errors import PreconditionError
from ..meta_keys import EXAMPLE_INPUTS
from ..registry import ANALYSES


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: ``run(gm, example_inputs)`` writes ``key``; ``present(gm)`` says whether ``gm``
    already has the result (used when it cannot be run); ``remedy`` says how a user provides it."""

    name: str
    run: Callable[[fx.GraphModule, Sequence[Any] | None], None]
    key: str
    present: Callable[[fx.GraphModule], bool]
    needs_inputs: bool = True
    remedy: str = ""

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> None:
        self.run(gm, example_inputs)


def register_analysis(
    name: str,
    *,
    key: str,
    present: Callable[[fx.GraphModule], bool],
    needs_inputs: bool = True,
    remedy: str = "",
    replace: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(gm, example_inputs)`` as analysis ``name`` (returns ``fn`` unchanged)."""

    def add(fn: Callable) -> Callable:
        ANALYSES.register(name, Analysis(name, fn, key, present, needs_inputs, remedy), replace=replace)
        return fn

    return add


def example_inputs_of(gm: fx.GraphModule, given: Sequence[Any] | None = None) -> Sequence[Any] | None:
    """``given``, else the inputs ``sparsify`` traced ``gm`` with (``gm.meta["example_inputs"]``), else None."""
    if given is not None:
        return given
    meta = getattr(gm, "meta", None)
    return meta.get(EXAMPLE_INPUTS) if isinstance(meta, dict) else None


def missing(pass_label: str, name: str, analysis: Any = None) -> PreconditionError:
    """The error for a pass whose input lacks analysis ``name`` and that cannot be provided now."""
    key = getattr(analysis, "key", None)
    where = f" (meta key '{key}')" if key else ""
    remedy = getattr(analysis, "remedy", "") or "run it before the pass"
    return PreconditionError(
        f"pass '{pass_label}' needs the '{name}' analysis{where}, which cannot be run without example inputs: {remedy}"
    )


def provide(gm: fx.GraphModule, names: Sequence[str], example_inputs: Sequence[Any] | None = None) -> list[str]:
    """Run each registered analysis of ``names`` whose result ``gm`` lacks, where the example inputs allow it
    (``example_inputs`` or ``gm.meta["example_inputs"]``); returns the names run. Analyses that cannot tell
    whether their result is there (plain callables) are left to the pass manager."""
    inputs = example_inputs_of(gm, example_inputs)
    ran = []
    for name in names:
        analysis = ANALYSES.get(name) if name in ANALYSES else None
        if not isinstance(analysis, Analysis) or analysis.present(gm):
            continue
        if analysis.needs_inputs and inputs is None:
            continue  # the pass's own precondition decides
        analysis(gm, inputs)
        ran.append(name)
    return ran


from . import costs, shapes  # noqa: E402,F401  (register the core analyses)

__all__ = ["Analysis", "register_analysis", "example_inputs_of", "missing", "provide", "shapes", "costs"]
