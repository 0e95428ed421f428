"""Keeping masks identical across ranks under ``DistributedDataParallel``.

Decisions are taken from all-reduced statistics: DDP already averages the (dense, where asked)
weight gradients RigL grows from; CTRE's activation statistics are summed with ``all_reduce``; random
choices use generators seeded from (seed, step, layer) so all ranks draw the same. As a final
guarantee every update ends with ``sync_layers``: rank 0 broadcasts each updated layer's mask and weight
(optimizer slots were changed at the same positions on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


SYNCED_TENSORS = {"masked": ("mask", "weight"), "sparse": ("values", "crow", "col", "t_crow", "t_col", "t_perm")}


def sync_layers(modules) -> None:
    """Broadcast each module's topology and weights from rank 0 (masked: ``mask``, ``weight``; sparse storage:
    ``values`` and the index buffers, whose sizes agree on every rank because every rank took the same decision);
    a no-op when not distributed."""
    if not is_distributed():
        return
    for module in modules:
        kind = "masked" if hasattr(module, "mask") else "sparse"
        for name in SYNCED_TENSORS[kind]:
            dist.broadcast(getattr(module, name).data, src=0)
