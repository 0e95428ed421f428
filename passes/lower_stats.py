"""What ``lower`` reports: multiply-adds each lowered layer executes beside its dense count, and model totals."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

ROW_MIN = 48  # backends/cpp_kernel.py `segments`: output rows this wide are computed without padding columns


def executed_macs(old: nn.Module, new: nn.Module, weight: torch.Tensor, shape: tuple[int, ...]) -> dict[str, int]:
    """``{"dense_macs": ..., "executed_macs": ...}`` multiply-adds of one call on an input of ``shape``: the dense
    layer's and what ``new`` runs (a sparse kernel: its non-zeros; the direct convolution: its non-zeros times the
    grid columns it computes, which include the padding columns of rows narrower than ``ROW_MIN``; a dense choice:
    the dense count)."""
    from sparsifx.backends.sparse_conv import DirectSparseConv2d, conv_output_size, geometry
    from sparsifx.backends.sparse_kernels import SPARSE_KERNELS
    from sparsifx.backends.sparse_modules import SparseConv2d, SparseLinear

    nnz = int(weight.count_nonzero())
    if isinstance(old, nn.Linear):
        rows = math.prod(shape[:-1])
        dense = weight.numel() * rows
        sparse = isinstance(new, SparseLinear) and SPARSE_KERNELS.get(new.kernel_for(rows)).sparse
        return {"dense_macs": dense, "executed_macs": nnz * rows if sparse else dense}
    n, _, h, w = shape
    ho, wo = conv_output_size(h, w, old.kernel_size, old.stride, old.padding, old.dilation)
    dense = weight.numel() * n * ho * wo
    if isinstance(new, DirectSparseConv2d):
        g = geometry(h, w, new.kernel_size, new.stride, new.padding, new.dilation)
        columns = g.wo if g.wo >= ROW_MIN or g.wq == g.wo else g.wq  # narrow rows compute their padding columns
        return {"dense_macs": dense, "executed_macs": nnz * n * g.ho * columns}
    if isinstance(new, SparseConv2d) and SPARSE_KERNELS.get(new.kernel).sparse:
        return {"dense_macs": dense, "executed_macs": nnz * n * ho * wo}
    return {"dense_macs": dense, "executed_macs": dense}


def model_summary(layers: dict[str, dict]) -> dict:
    """Totals over the lowered layers: multiply-adds (dense, executed, ratio) and, over the layers whose
    candidates were timed, the sum of their dense times over the sum of the chosen ones (the layer-sum prediction
    of the model's speedup; the rest of the model is not in it)."""
    macs = [info for info in layers.values() if "dense_macs" in info]
    timed = [info for info in layers.values() if "lowered_ms" in info]
    out: dict = {"layers": len(layers), "backends": {}}
    for info in layers.values():
        out["backends"][info.get("backend", "?")] = out["backends"].get(info.get("backend", "?"), 0) + 1
    if macs:
        dense, executed = sum(m["dense_macs"] for m in macs), sum(m["executed_macs"] for m in macs)
        out.update(dense_macs=dense, executed_macs=executed, flop_speedup=round(dense / max(1, executed), 2))
    if timed:
        dense_ms = sum(t["dense_ms"] for t in timed)
        chosen_ms = sum(t["lowered_ms"] for t in timed)
        out.update(
            timed_layers=len(timed),
            layers_dense_ms=round(dense_ms, 3),
            layers_lowered_ms=round(chosen_ms, 3),
            predicted_speedup=round(dense_ms / max(chosen_ms, 1e-9), 2),
        )
    return out
