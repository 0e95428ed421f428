"""``lower``'s micro-batch step: the model planned for, and run on, a few samples at a time.

At a large batch the activations between two lowered layers overflow the caches (resnet50 at batch 16: up to
51 MB), and the layer choices ``lower`` measures at that batch are made for memory-bound layers. Run a copy of the
model planned at the chunk size over the batch chunk by chunk (``backends/micro_batch.py``) and each layer reads
its input from cache. This step lowers such a copy, checks that its outputs match the whole-batch lowered model on
the example inputs (a model that mixes the samples of a batch fails here), times both and keeps the faster: the
graph becomes ``placeholders -> MicroBatched -> output``. ``lower_summary["micro_batch"]`` records the choice
with both times, or why it was not tried.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from sparsifx.errors import SparsifxError
from sparsifx.meta_keys import EXAMPLE_INPUTS
from sparsifx.module_utils import eval_mode

from .lower_whole_model import TOLERANCE, _as_tuple, flat_io_reason, replace_with

MICRO_BATCH_NAME = "micro_batched"
AUTO_CHUNK = 1  # resnet50 at batch 16: chunks of 1, 2 and 4 gave 2.5, 2.4 and 2.3x onnxruntime dense


def skip_reason(gm: fx.GraphModule, inputs, size: int) -> str | None:
    """Why ``gm`` cannot run in chunks of ``size`` on ``inputs`` (None: it can be tried)."""
    if inputs is None:
        return "no example inputs to plan and time the chunks on"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(placeholders) or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        return "the model's inputs are not all tensors with a batch dimension given as example inputs"
    sizes = {x.shape[0] for x in inputs}
    if len(sizes) != 1:
        return f"the example inputs differ in their first (batch) dimension: {sorted(sizes)}"
    if sizes.pop() <= size:
        return f"the example batch is not larger than the chunk ({size})"
    return flat_io_reason(gm)


def chunk_copy(gm: fx.GraphModule, inputs, size: int) -> fx.GraphModule:
    """A copy of ``gm`` (not yet lowered) whose example inputs and recorded shapes are those of one chunk."""
    from sparsifx.analysis.shapes import record_shapes

    body = copy.deepcopy(gm)
    chunk = tuple(x[:size] for x in inputs)
    body.meta = {EXAMPLE_INPUTS: chunk}
    with eval_mode(body):
        record_shapes(body, chunk)
    return body


def keep_faster(gm: fx.GraphModule, body: fx.GraphModule, size: int, inputs, reps: int, force: bool = False) -> dict:
    """Time the lowered ``gm`` on the whole batch against ``body`` (lowered at ``size``) run in chunks; rewrite
    ``gm`` to the chunked form where that is faster (``force``: whenever the outputs match)."""
    from sparsifx.backends.cost_model import median_ms
    from sparsifx.backends.micro_batch import MicroBatched

    body.meta = {}
    chunked = MicroBatched(body, size).eval()
    inputs = tuple(inputs)
    with eval_mode(gm), torch.inference_mode():
        try:
            torch.testing.assert_close(_as_tuple(chunked(*inputs)), _as_tuple(gm(*inputs)), **TOLERANCE)
        except (AssertionError, SparsifxError) as exc:
            return {"kept": "whole batch", "size": size, "skipped": f"the chunked outputs differ: {str(exc)[:200]}"}
        ms = {} if force else median_ms({"whole_batch": lambda: gm(*inputs), "chunks": lambda: chunked(*inputs)}, reps)
    kept = "chunks" if force or ms["chunks"] < ms["whole_batch"] else "whole batch"
    if kept == "chunks":
        replace_with(gm, chunked.train(gm.training), MICRO_BATCH_NAME)
    return {"kept": kept, "size": size, **{f"{k}_ms": round(v, 3) for k, v in ms.items()}}
