"""``sparsify``: trace -> recipe passes -> transformed module, leaving the user's model untouched."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from .pass_manager import PassManager, Tolerance
from .recipe import Recipe
from .tracing import trace


def sparsify(model: torch.nn.Module, recipe: Recipe | Mapping | str, example_inputs: Sequence[Any] | None = None,
             verify: bool = False, leaf_modules: Iterable[str | type] = (), progress: bool = False,
             tolerance: Tolerance = Tolerance()) -> fx.GraphModule:
    """Apply ``recipe`` (a Recipe, dict, YAML string or YAML path) to a copy of ``model``.

    The recipe is validated before the model is touched; the model itself is never mutated. With
    ``verify=True`` and ``example_inputs``, semantics-preserving passes are checked numerically.
    ``gm.meta["history"]`` records which passes ran and whether each modified the module.
    """
    recipe = Recipe.load(recipe)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    gm.meta["example_inputs"] = example_inputs
    manager = PassManager.from_recipe(recipe, example_inputs=example_inputs, verify=verify,
                                      progress=progress, tolerance=tolerance)
    result = manager.run(gm)
    result.gm.meta["history"] = result.history
    result.gm.meta["recipe"] = recipe
    return result.gm
