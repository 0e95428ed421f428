"""Growth criteria and new-weight initialisations (``GROWTH`` and ``GROW_INIT`` registries).

``GROWTH[name](ctrl, name, module) -> score`` (higher grows first; the caller excludes kept positions):
``gradient`` |∂L/∂(W⊙M)| (RigL; needs the dense gradient of this step), ``momentum`` |optimizer momentum|
(sparse momentum), ``random`` i.i.d. uniform scores from the controller's seeded generator (SET, CTRE's
random part), ``cosine`` CTRE's activation cosine similarity (``ctrl.state["cosine"][name]``).

``GROW_INIT[name](shape, n, dtype, device, generator) -> values`` for ``n`` grown positions of a weight of ``shape``:
``zeros`` (RigL, sparse momentum,
SET Keras), ``normal`` N(0,1)/10 (SET numpy tutorial), ``kaiming_uniform`` U(±sqrt(6/fan_in)) (CTRE's
``random_uniform``; fan_in = in_features·kernel in the PyTorch layout).
"""

from __future__ import annotations

import math

import torch

from sparsifx.errors import PassError
from sparsifx.registry import Registry

from .mask_ops import momentum_of, topk_mask

GROWTH: Registry = Registry("growth criterion")
GROW_INIT: Registry = Registry("new-weight initialisation")


@GROWTH.register("gradient")
def gradient_score(ctrl, name: str, module) -> torch.Tensor:
    if module.weight.grad is None:
        raise PassError(
            f"gradient growth on layer '{name}' needs the dense weight gradient of this step, but "
            "weight.grad is None (was loss.backward() called before optimizer.step()?)"
        )
    return module.weight.grad.detach().abs()


@GROWTH.register("momentum")
def momentum_score(ctrl, name: str, module) -> torch.Tensor:
    return momentum_of(ctrl.optimizer, module.weight).detach().abs()


@GROWTH.register("random")
def random_score(ctrl, name: str, module) -> torch.Tensor:
    return torch.rand(module.weight.shape, generator=ctrl.generator("grow", name)).to(module.weight.device)


@GROWTH.register("cosine")
def cosine_score(ctrl, name: str, module) -> torch.Tensor:
    scores = ctrl.state.get("cosine", {})
    if name not in scores:
        raise PassError(f"cosine growth on layer '{name}' has no activation statistics yet")
    return scores[name].to(module.weight.device)


def grow_top(score: torch.Tensor, excluded: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` highest-scoring positions outside ``excluded`` (RigL: score[M1] = min − 1, then top-n)."""
    score = score.float().masked_fill(excluded.bool(), float("-inf"))
    n = min(int(n), int((~excluded.bool()).sum()))
    return topk_mask(score, n) & ~excluded.bool()


@GROW_INIT.register("zeros")
def zeros_init(shape, n: int, dtype, device, generator: torch.Generator) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, device=device)


@GROW_INIT.register("normal")
def normal_init(shape, n: int, dtype, device, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, generator=generator) / 10.0).to(device, dtype)


@GROW_INIT.register("kaiming_uniform")
def kaiming_uniform_init(shape, n: int, dtype, device, generator: torch.Generator) -> torch.Tensor:
    fan_in = math.prod(shape[1:])
    bound = math.sqrt(6.0 / fan_in)
    return ((torch.rand(n, generator=generator) * 2 - 1) * bound).to(device, dtype)
