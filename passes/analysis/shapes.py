"""Analysis ``shapes``: records ``node.meta["tensor_meta"]`` by running the example inputs."""
from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from sparsifx.errors import PreconditionError
from sparsifx.registry import ANALYSES
from sparsifx.tracing import record_shapes


@ANALYSES.register("shapes")
def shapes(gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> None:
    if example_inputs is None:
        raise PreconditionError("the 'shapes' analysis needs example_inputs; pass example_inputs=(tensor,)")
    record_shapes(gm, example_inputs)
