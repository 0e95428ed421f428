"""Top-K selection helpers: keep counts, exact k-th-largest thresholds, threshold and exact masks.

Shared by SWAT and usable by the DST methods. Conventions (docs/algorithms.md#conventions):

* ``keep_count(numel, s) = ceil((1 - s) * numel)`` clamped to ``[0, numel]``.
* threshold mode (SWAT-compatible): keep ``|x| >= kth_largest(|x|, k)`` -- ties keep more than ``k``.
* exact mode: exactly ``k`` entries (ties at the threshold broken by lowest flat index).

Thresholds are Python floats (no tensor to keep alive). The selection itself runs in the fastest
exact kernel for the tensor (``kernels.ops_for``: NumPy partition on CPU, a sample-bracketed
``torch.kthvalue`` elsewhere).
"""

from __future__ import annotations

import math

import torch

from .kernels import ops_for


def keep_count(numel: int, sparsity: float) -> int:
    """Number of entries kept at ``sparsity``: ``ceil((1 - s) * numel)`` (float noise removed)."""
    k = math.ceil(round((1.0 - float(sparsity)) * numel, 6))
    return max(0, min(int(numel), k))


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The exact ``k``-th largest entry of ``values`` (any shape).

    ``k <= 0`` gives ``+inf`` (keep nothing); ``k >= numel`` gives the minimum (keep everything).
    """
    n = values.numel()
    if k <= 0 or n == 0:
        return float("inf")
    if k >= n:
        return float(values.min())
    return ops_for(values).kth_largest(values, k)


def abs_kth_largest(t: torch.Tensor, k: int) -> float:
    """The ``k``-th largest ``|t|`` (one ``abs`` pass, selection in place on that copy)."""
    n = t.numel()
    if 0 < k < n:
        return ops_for(t).abs_kth_largest(t, k)
    return kth_largest(t.detach().abs(), k)


def abs_topk_mask(t: torch.Tensor, k: int, floor: float = float("-inf")) -> tuple[torch.Tensor, float]:
    """``(|t| >= max(thr, floor), thr)``, ``thr`` = k-th largest ``|t|`` (one pass of ``abs``)."""
    n = t.numel()
    if 0 < k < n:
        return ops_for(t).topk_mask(t, k, floor)
    thr = kth_largest(t.detach().abs(), k)
    return t.detach().abs() >= max(thr, floor), thr


def threshold_mask(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """``(scores >= kth_largest(scores, k), threshold)``; ties keep more than ``k``."""
    thr = kth_largest(scores, k)
    return scores >= thr, thr


def exact_mask(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Exactly ``k`` largest entries (ties broken by lowest flat index), and the k-th largest value."""
    thr = kth_largest(scores, k)
    mask = scores > thr
    missing = k - int(mask.sum())
    if missing > 0:
        ties = (scores == thr).reshape(-1).nonzero().squeeze(1)[:missing]
        mask.view(-1)[ties] = True
    return mask, thr


def kernel_scores(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of every ``(out, in)`` kernel of a conv weight (``|W|`` itself for a Linear weight)."""
    if weight.dim() <= 2:
        return weight.detach().abs()
    return weight.detach().abs().sum(dim=tuple(range(2, weight.dim())))
