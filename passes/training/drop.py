"""Drop criteria: which active connections a DST update keeps (``DROP`` registry, by name).

Each entry is ``fn(weight, mask, amount, generator) -> keep`` (bool, ``keep ⊆ mask``):

* ``magnitude`` — RigL/CTRE: keep the ``nnz − amount`` largest ``|W| + N(0, 1e-5)`` among active positions
  (exact count; the noise breaks ties). Departure from rigl's TF code: inactive positions are never
  "kept" (TF ranks all positions, an inactive one could outrank an active weight below the noise).
* ``set_zeta`` — SET (docs/algorithms.md#set): ``amount = ζ``; over the sorted active values ``v`` with
  ``n_neg`` negatives, ``neg_thr = v[int((1−ζ)·n_neg)]``,
  ``pos_thr = v[int(min(len−1, n_neg + ζ·(len−n_neg)))]``;
  keep ``w > pos_thr or w < neg_thr`` (ζ of the negatives and of the positives nearest zero go).
"""

from __future__ import annotations

import torch

from sparsifx.registry import Registry

from .mask_ops import noise, topk_mask

DROP: Registry = Registry("drop criterion")
NOISE_STD = 1e-5


@DROP.register("magnitude")
def magnitude_keep(weight: torch.Tensor, mask: torch.Tensor, amount: int, generator: torch.Generator) -> torch.Tensor:
    active = mask.bool()
    n_keep = int(active.sum()) - int(amount)
    score = weight.detach().abs().float().cpu() + noise(weight.shape, NOISE_STD, generator)
    score = score.to(weight.device).masked_fill(~active, float("-inf"))
    return topk_mask(score, n_keep) & active


def set_thresholds(values: torch.Tensor, zeta: float) -> tuple[float, float]:
    v = values.sort().values
    n_neg = int((v < 0).sum())
    neg_thr = v[min(len(v) - 1, int((1 - zeta) * n_neg))]
    pos_thr = v[int(min(len(v) - 1, n_neg + zeta * (len(v) - n_neg)))]
    return float(neg_thr), float(pos_thr)


@DROP.register("set_zeta")
def set_keep(weight: torch.Tensor, mask: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    active = mask.bool()
    if not active.any():
        return active
    neg_thr, pos_thr = set_thresholds(weight.detach()[active], float(amount))
    w = weight.detach()
    return active & ((w > pos_thr) | (w < neg_thr))
