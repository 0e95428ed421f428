"""``lower``'s micro-batch step: the model planned for, and run on, a few samples at a time.

At a large batch the activations between two lowered layers overflow the caches (resnet50 at batch 16: up to
51 MB), and the layer choices ``lower`` measures at that batch are made for memory-bound layers. Run a copy of the
model planned at the chunk size over the batch chunk by chunk (``backends/micro_batch.py``) and each layer reads
its input from cache. ``lower`` lowers such copies (``auto_sizes``), this step checks that their outputs match the
whole-batch lowered model on the example inputs (a model that mixes the samples of a batch fails here), times them
and the whole batch and keeps the fastest: the graph becomes ``placeholders -> MicroBatched -> output``.
``lower_summary["micro_batch"]`` records the choice with every time, or why it was not tried.
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


def auto_sizes(threads: int) -> tuple[int, ...]:
    """The chunk sizes ``micro_batch: auto`` plans and times: one sample, and one per thread. resnet50 at 90%,
    batch 16, measured against onnxruntime dense: on one thread chunks of 1, 2 and 4 gave 2.5, 2.4 and 2.3x; on
    two threads 2.2-2.6, 2.7-2.8 and 2.4x."""
    return tuple(sorted({1, max(1, threads)}))


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


def keep_fastest(gm: fx.GraphModule, bodies: dict[int, fx.GraphModule], inputs, reps: int, force: bool = False):
    """Time the lowered ``gm`` on the whole batch against each body (lowered at its chunk size) run in chunks of
    that size; rewrite ``gm`` to the fastest chunked form where it beats the whole batch (``force``: one size,
    kept whenever its outputs match). Returns the outcome ``lower_summary["micro_batch"]`` records."""
    from sparsifx.backends.cost_model import median_ms
    from sparsifx.backends.micro_batch import MicroBatched

    chunked = {size: MicroBatched(body, size).eval() for size, body in bodies.items()}
    for body in bodies.values():
        body.meta = {}
    inputs = tuple(inputs)
    fns, differ = {"whole_batch": lambda: gm(*inputs)}, {}
    with eval_mode(gm), torch.inference_mode():
        reference = _as_tuple(gm(*inputs))
        for size, module in chunked.items():
            try:
                torch.testing.assert_close(_as_tuple(module(*inputs)), reference, **TOLERANCE)
                fns[f"chunks_of_{size}"] = lambda module=module: module(*inputs)
            except (AssertionError, SparsifxError) as exc:
                differ[size] = str(exc)[:200]
        if differ:  # a model that mixes samples: no size is trusted
            why = next(iter(differ.values()))
            return {"kept": "whole batch", "sizes": sorted(chunked), "skipped": f"the chunked outputs differ: {why}"}
        ms = {} if force else median_ms(fns, reps)
    best = f"chunks_of_{next(iter(chunked))}" if force else min(ms, key=ms.__getitem__)
    outcome = {"kept": "whole batch", "sizes": sorted(chunked), **{f"{k}_ms": round(v, 3) for k, v in ms.items()}}
    if best == "whole_batch":
        return outcome
    size = int(best.removeprefix("chunks_of_"))
    replace_with(gm, chunked[size].train(gm.training), MICRO_BATCH_NAME)
    return {**outcome, "kept": "chunks", "size": size}
