"""``sparsify``: trace -> recipe passes -> transformed module, leaving the user's model untouched."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from .meta_keys import EXAMPLE_INPUTS, HISTORY, RECIPE
from .pass_manager import PassManager, Tolerance
from .recipe import Recipe
from .tracing import trace

log = logging.getLogger(__name__)


def sparsify(
    model: torch.nn.Module,
    recipe: Recipe | Mapping | str,
    example_inputs: Sequence[Any] | None = None,
    verify: bool = False,
    leaf_modules: Iterable[str | type] = (),
    progress: bool = False,
    tolerance: Tolerance = Tolerance(),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Apply ``recipe`` (a Recipe, dict, YAML string or YAML path) to a copy of ``model``.

    The recipe is validated before the model is touched; the model itself is never mutated. Example
    inputs the model rejects raise ``ExampleInputError`` (a ``TraceError``) before any pass runs. With
    ``verify=True`` and ``example_inputs``, semantics-preserving passes are checked numerically.
    ``leaf_modules`` (paths or classes kept opaque) and ``concrete_args`` (values fixed at trace time, e.g.
    flags that drive control flow) go to :func:`sparsifx.trace`. ``gm.meta["history"]`` records which passes ran and
    whether each modified the module. Every module
    of the result keeps the ``training`` flag its namesake has in ``model`` (e.g. BatchNorms frozen in a
    model being fine-tuned stay in eval mode).
    """
    recipe = Recipe.load(recipe)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    flags = {name: m.training for name, m in model.named_modules()} if isinstance(model, torch.nn.Module) else {}
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    gm.meta[EXAMPLE_INPUTS] = example_inputs
    manager = PassManager.from_recipe(
        recipe, example_inputs=example_inputs, verify=verify, progress=progress, tolerance=tolerance
    )
    result = manager.run(gm)
    result.gm.meta[HISTORY] = result.history
    result.gm.meta[RECIPE] = recipe
    _keep_training_flags(result.gm, flags)
    return result.gm


def _keep_training_flags(gm: fx.GraphModule, flags: Mapping[str, bool]) -> None:
    """Safety net: give each module of ``gm`` the flag of its namesake in the user's model. Passes and
    analyses already keep the flags (``preserve_training_flags``); a difference on a module the graph calls
    is logged (fx's fresh path containers, which never run, default to training=True and are fixed quietly)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, m in gm.named_modules():
        if name in flags and m.training != flags[name]:
            if name in called:
                log.warning(
                    "sparsify: module '%s' came back with training=%s; restored the user's %s",
                    name,
                    m.training,
                    flags[name],
                )
            m.training = flags[name]
