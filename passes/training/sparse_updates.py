"""Topology updates of sparse-storage layers (``SparseLinear``): the index-based twins of the masked updates.

Each function decides on the layer's ``values`` and sorted linear positions only and installs the result with
``SparseController.replace_topology`` (optimizer slots follow the weights). Up to ``DENSE_DRAW_LIMIT`` positions
the random choices are drawn exactly as the masked storage draws them (same positions from the same seed, so both
storages train identically); beyond it they are drawn by index sampling from the same distribution.
"""

from __future__ import annotations

import math

import torch

from .distributed import all_reduce_sum
from .drop import NOISE_STD, set_thresholds
from .mask_ops import DENSE_DRAW_LIMIT, keys_of, noise, random_among, random_keys, topk_mask


def _random_grow(shape: tuple, kept_keys: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    numel = math.prod(shape)
    if numel <= DENSE_DRAW_LIMIT:
        candidates = torch.ones(numel, dtype=torch.bool)
        candidates[kept_keys.cpu()] = False
        return keys_of(random_among(candidates.view(shape), n, generator))
    return random_keys(numel, n, generator, excluded=kept_keys)


@torch.no_grad()
def set_evolve(ctrl, name: str, zeta: float, init) -> dict:
    """SET: remove ζ of the negative and ζ of the positive non-zeros closest to zero, regrow as many at random
    among the positions not kept (a just-removed one may be drawn again and is then re-initialised)."""
    module = ctrl.gm.get_submodule(name)
    v = module.values.detach()
    if not v.numel():
        return ctrl.replace_topology(name, torch.ones(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))
    neg_thr, pos_thr = set_thresholds(v, zeta)
    keep = (v > pos_thr) | (v < neg_thr)
    kept_keys = module.keys()[keep]
    grown = _random_grow(module.shape, kept_keys, v.numel() - int(keep.sum()), ctrl.generator("grow", name))
    return ctrl.replace_topology(name, keep, grown, init=init, revive=False, kind="set")


@torch.no_grad()
def rigl_update(ctrl, name: str, alpha: float, init) -> dict:
    """RigL: drop ``floor(α·nnz)`` of smallest ``|w| + N(0, 1e-5)``, grow as many positions of largest dense
    ``|∂L/∂W|`` outside the kept set; the dense gradient is formed from the probed ``(x, ∂y)`` one block of rows at
    a time (``SparseLinear.dense_grad_blocks``, ≤ 64 MB each) and all-reduced per block under DDP."""
    module = ctrl.gm.get_submodule(name)
    v = module.values.detach()
    nnz = v.numel()
    n_drop = math.floor(nnz * alpha)
    score = v.abs().float() + noise((nnz,), NOISE_STD, ctrl.generator("drop", name)).to(v.device)
    keep = topk_mask(score, nnz - n_drop)
    kept_keys = module.keys()[keep]
    best_score = torch.zeros(0)
    best_key = torch.zeros(0, dtype=torch.int64)
    for r0, block in module.dense_grad_blocks():
        g = all_reduce_sum(block).abs().flatten().cpu()
        base = r0 * module.in_features
        lo, hi = torch.searchsorted(kept_keys.cpu(), torch.tensor([base, base + g.numel()])).tolist()
        g[kept_keys[lo:hi].cpu() - base] = float("-inf")
        top = torch.topk(g, min(n_drop, g.numel()))
        best_score = torch.cat([best_score, top.values])
        best_key = torch.cat([best_key, top.indices + base])
        if best_score.numel() > n_drop:
            keep_best = torch.topk(best_score, n_drop).indices
            best_score, best_key = best_score[keep_best], best_key[keep_best]
    module.probe.clear()
    grown = best_key[best_score > float("-inf")].sort().values
    return ctrl.replace_topology(name, keep, grown, init=init, revive=True, kind="rigl")


@torch.no_grad()
def magnitude_prune(ctrl, name: str, n_keep: int) -> dict | None:
    """GMP: keep the ``n_keep`` largest ``|w|`` (nnz shrinks; pruned weights never return)."""
    module = ctrl.gm.get_submodule(name)
    if n_keep >= module.nnz:
        return None
    keep = topk_mask(module.values.detach().abs(), n_keep)
    return ctrl.replace_topology(name, keep, torch.zeros(0, dtype=torch.int64), kind="gmp")
