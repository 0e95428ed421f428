"""Importance criteria scoring every channel unit: ``IMPORTANCE.get(name)(gm, analysis, options)``.

A unit's score is the sum over its member tensors (conv/linear/norm weights, producing rows and
consuming columns) of the member's per-channel score divided by that member's mean score, so layers of
different scale weigh alike. Criteria:

- ``l1`` / ``l2``: norm of each weight slice.
- ``bn_scale``: ``|gamma|`` of BatchNorm members (network slimming); groups without BatchNorm use ``l1``.
- ``random``: uniform scores from ``options.seed``.
- ``taylor``: first-order Taylor ``|w * dL/dw|`` summed per slice, from one forward/backward on
  ``options.batch`` (default ``gm.meta["example_inputs"]``) with ``options.loss_fn(output)`` (default
  ``0.5 * sum(output**2) / batch``, any callable returning a scalar).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from sparsifx.errors import PreconditionError
from sparsifx.meta_keys import EXAMPLE_INPUTS
from sparsifx.module_utils import eval_mode, submodule
from sparsifx.registry import Registry

from .coupling import ChannelAnalysis
from .tracker import Member

IMPORTANCE: Registry[Callable] = Registry("importance criterion")


def member_tensor(gm: fx.GraphModule, m: Member) -> torch.Tensor:
    owner = submodule(gm, m.owner) if m.owner else gm
    return getattr(owner, m.tensor)


def slice_scores(t: torch.Tensor, dim: int, p: int) -> torch.Tensor:
    """The ``p``-norm of every slice of ``t`` along ``dim`` (strided dims reduced in cache-sized chunks)."""
    x = t.detach()
    dim %= max(1, x.ndim)
    n = x.shape[dim] if x.ndim else 1
    lead = math.prod(x.shape[:dim])
    x = x.reshape(lead, n, -1)
    if lead == 1:
        return torch.linalg.vector_norm(x[0], ord=p, dim=1).float()
    out = torch.zeros(n, dtype=torch.float32)
    step = max(1, (1 << 20) // max(1, x.shape[1] * x.shape[2]))
    for i in range(0, lead, step):
        blk = x[i : i + step].float()
        out += (blk.abs() if p == 1 else blk.square()).sum(dim=(0, 2))
    return out if p == 1 else out.sqrt()


def accumulate(gm: fx.GraphModule, a: ChannelAnalysis, fn: Callable[[Member, torch.Tensor], Any]) -> np.ndarray:
    scores = np.zeros(len(a.prunable), dtype=np.float64)
    for m in a.members:
        if m.role == "aux" or m.tensor == "bias":
            continue
        t = member_tensor(gm, m)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        s = fn(m, t)
        if s is None:
            continue
        s = s.double().numpy()
        np.add.at(scores, a.unit[m.atoms.numpy()], s / (s.mean() + 1e-12))
    return scores


def kernel_sums(w: torch.Tensor, p: int) -> torch.Tensor:
    """``Σ |w[o, i, ...]|^p`` over the kernel dims: ``[out, in]`` float32, in cache-sized blocks of rows."""
    x = w.flatten(2)
    out = torch.empty(x.shape[:2], dtype=torch.float32)
    step = max(1, (1 << 18) // max(1, x.shape[1] * x.shape[2]))
    for i in range(0, x.shape[0], step):
        blk = x[i : i + step].float()
        torch.sum(blk.abs() if p == 1 else blk.square(), dim=2, out=out[i : i + step])
    return out


def norm_scores(p: int) -> Callable[[Member, torch.Tensor], torch.Tensor]:
    """``(member, tensor) -> p-norm of every slice along member.dim``. A conv weight with k x k kernels is read
    once: its per-kernel ``|W|^p`` sums (``[out, in]``) serve both its output- and input-channel members."""
    kernels: dict[int, torch.Tensor] = {}

    def score(m: Member, t: torch.Tensor) -> torch.Tensor:
        dim = m.dim % max(1, t.dim())
        if t.dim() <= 2 or dim > 1 or math.prod(t.shape[2:]) == 1:  # Linear, 1x1: two strided passes are cheaper
            return slice_scores(t, m.dim, p)
        k = kernels.get(id(t))
        if k is None:
            k = kernels[id(t)] = kernel_sums(t.detach(), p)
        s = k.sum(1 - dim)
        return s if p == 1 else s.sqrt()

    return score


@IMPORTANCE.register("l1")
def l1(gm: fx.GraphModule, a: ChannelAnalysis, options: Any = None) -> np.ndarray:
    return accumulate(gm, a, norm_scores(1))


@IMPORTANCE.register("l2")
def l2(gm: fx.GraphModule, a: ChannelAnalysis, options: Any = None) -> np.ndarray:
    return accumulate(gm, a, norm_scores(2))


@IMPORTANCE.register("bn_scale")
def bn_scale(gm: fx.GraphModule, a: ChannelAnalysis, options: Any = None) -> np.ndarray:
    def gamma(m: Member, t: torch.Tensor):
        owner = submodule(gm, m.owner) if m.owner else gm
        is_bn = isinstance(owner, torch.nn.modules.batchnorm._BatchNorm)
        return t.detach().float().abs() if is_bn and m.tensor == "weight" else None

    scores = accumulate(gm, a, gamma)
    fallback = l1(gm, a)
    for g in a.groups:
        if not np.any(scores[g.units]):
            scores[g.units] = fallback[g.units]
    return scores


@IMPORTANCE.register("random")
def random(gm: fx.GraphModule, a: ChannelAnalysis, options: Any = None) -> np.ndarray:
    seed = getattr(options, "seed", 0)
    return np.random.default_rng(seed).random(len(a.prunable))


def default_loss(output: Any) -> torch.Tensor:
    out = output[0] if isinstance(output, (tuple, list)) else output
    return 0.5 * out.float().pow(2).sum() / max(1, out.shape[0] if out.ndim else 1)


@IMPORTANCE.register("taylor")
def taylor(gm: fx.GraphModule, a: ChannelAnalysis, options: Any = None) -> np.ndarray:
    batch = getattr(options, "batch", None) or gm.meta.get(EXAMPLE_INPUTS)
    if batch is None:
        raise PreconditionError(
            "importance 'taylor' needs a batch: pass batch=(inputs,) to channel_prune or set gm.meta['example_inputs']"
        )
    loss_fn = getattr(options, "loss_fn", None) or default_loss
    batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    params = [p for p in gm.parameters()]
    saved = [(p.requires_grad, p.grad) for p in params]
    with eval_mode(gm):  # no running-stat updates, no dropout
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        try:
            with torch.enable_grad():
                loss_fn(gm(*batch)).backward()

            def score(m: Member, t: torch.Tensor):
                g = t.grad if t.grad is not None else torch.zeros_like(t)
                return slice_scores(t.detach() * g, m.dim, 1)

            return accumulate(gm, a, score)
        finally:
            for p, (req, grad) in zip(params, saved):
                p.grad = grad
                p.requires_grad_(req)
