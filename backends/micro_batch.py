"""``MicroBatched``: a lowered model run on a batch a few samples at a time.

The sparse kernels run layer by layer; at batch 16 a resnet50's activations between two layers (up to 51 MB) no
longer fit the caches, so every layer reads its input from memory, and the weights of the late layers stream once
per image anyway. Run one image at a time through the whole network and each layer's input is still in cache
from the layer before: resnet50 at 90% sparsity on one thread went from 1.9x to 3.0x onnxruntime dense at batch 16
(``benchmarks/results/sparse_end_to_end.md``). ``lower`` plans the body at the chunk size and keeps this form only
where it measures it faster and the outputs match the whole-batch run (``passes/lower_micro_batch.py``).

The body must treat samples independently; every chunk's outputs must have the chunk's batch size (checked on
every call). Inference only; a tracing leaf. The body is a GraphModule that ``sparsifx.save`` stores as data.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx.errors import BackendError
from sparsifx.tracing import register_leaf_type

MAX_CHUNK = 1 << 20


def _batch(inputs: tuple) -> int:
    sizes = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(sizes) != 1 or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        raise BackendError(
            f"MicroBatched needs tensor inputs that share their first (batch) dimension; got "
            f"{[tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]}"
        )
    return sizes.pop()


def _check_chunk(out, n: int):
    parts = (out,) if isinstance(out, torch.Tensor) else out
    if not isinstance(parts, (tuple, list)) or not all(isinstance(p, torch.Tensor) and p.dim() > 0 for p in parts):
        raise BackendError("MicroBatched: the body must return a tensor or a tuple / list of tensors")
    if any(p.shape[0] != n for p in parts):
        raise BackendError(
            f"MicroBatched: a chunk of {n} samples gave outputs of shapes {[tuple(p.shape) for p in parts]}; the "
            "model mixes samples of a batch and cannot run in chunks (lower it with micro_batch: false)"
        )
    return parts


@register_leaf_type
class MicroBatched(nn.Module):
    """``cat([body(*chunk) for chunk in split(inputs, size)])`` along the first dimension."""

    def __init__(self, body: fx.GraphModule, size: int):
        super().__init__()
        self.body = body
        self.size = int(size)
        self._after_load()

    def _after_load(self) -> None:
        """Called by ``sparsifx.load`` (the body was rebuilt and validated by the loader)."""
        if type(self.size) is not int or not 1 <= self.size <= MAX_CHUNK:
            raise BackendError(f"MicroBatched: chunk size must be an integer in [1, {MAX_CHUNK}]")
        if not isinstance(getattr(self, "body", None), fx.GraphModule):
            raise BackendError("MicroBatched: the body must be a GraphModule")

    def forward(self, *inputs: torch.Tensor):
        n = _batch(inputs)
        if n <= self.size:
            return self.body(*inputs)
        chunks = list(zip(*(x.split(self.size) for x in inputs)))
        outs = [self.body(*chunk) for chunk in chunks]
        parts = [_check_chunk(out, chunk[0].shape[0]) for out, chunk in zip(outs, chunks)]
        joined = [torch.cat(p) for p in zip(*parts)]
        return joined[0] if isinstance(outs[0], torch.Tensor) else type(outs[0])(joined)

    def extra_repr(self) -> str:
        return f"size={self.size}"
