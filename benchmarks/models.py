"""The benchmarks' model zoo: small MNIST models by name, and random-weight torchvision-style models made informative.

Small MNIST models for the sparse-training benchmark, by name.

Every model takes ``(N, 1, 28, 28)`` images and returns ``(N, 10)`` logits:

* ``lenet300100``: LeNet-300-100, 784-300-100-10 MLP with ReLU (the RigL / sparse momentum MNIST model).
* ``mlp1024x3``: 784-1024-1024-1024-10 MLP with ReLU (issue 5's SWAT memory target).
* ``smallcnn``: conv5x5(16)-BN-ReLU-pool, conv5x5(32)-BN-ReLU-pool, fc 512-100-10 (LeNet-5 sized, with BatchNorm).

``build_model(name, seed)`` gives the same initial weights for the same seed.

``informative_random_weights(model, side)`` prepares a randomly initialised image model (torchvision, timm) for
the pruning and tracing sweeps.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

MODELS: dict[str, Callable[[], nn.Module]] = {}


def register(name: str):
    def add(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        MODELS[name] = builder
        return builder

    return add


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@register("lenet300100")
def lenet300100() -> nn.Module:
    return _mlp([784, 300, 100, 10])


@register("mlp1024x3")
def mlp1024x3() -> nn.Module:
    return _mlp([784, 1024, 1024, 1024, 10])


@register("smallcnn")
def smallcnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 12 x 12
        nn.Conv2d(16, 32, 5),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 4 x 4
        nn.Flatten(),
        nn.Linear(512, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def build_model(name: str, seed: int = 0) -> nn.Module:
    """Model ``name`` with weights drawn from ``torch.manual_seed(seed)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}")
    torch.manual_seed(seed)
    return MODELS[name]()


def informative_random_weights(model: nn.Module, side: int, batch: int = 2, norms_only: bool = False) -> nn.Module:
    """Make random weights informative: re-draw all-zero weight matrices (ViT's zero-initialised head would make
    every output 0) and calibrate BatchNorm running statistics on one random ``(batch, 3, side, side)`` batch
    (cumulative average: one batch sets the statistics exactly), so activations stay O(1). ``norms_only``: only
    the norms are in training mode for that batch, so the model's own eval path runs (no auxiliary heads, no
    dropout); otherwise the whole model is. Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        if norms_only:
            model.eval()
            for m in norms:
                m.train()
        if norms:
            if not norms_only:
                model.train()
            model(torch.randn(batch, 3, side, side, generator=gen))
    return model.eval()


def stratified_split(x, y, sizes, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stratified split of numpy arrays ``x``, ``y`` into parts of ``sizes`` samples (each part the same number per
    class, shuffled; ``np.random.RandomState(seed)``), ``x`` standardised with the first part's mean and std."""
    import numpy as np

    rng = np.random.RandomState(seed)
    classes = np.unique(y)
    per = [n // len(classes) for n in sizes]
    parts: list[list] = [[] for _ in per]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < sum(per):
            raise SystemExit(f"class {c} has {len(idx)} images < {sum(per)} requested")
        start = 0
        for k, n in enumerate(per):
            parts[k].append(idx[start : start + n])
            start += n
    idx = [rng.permutation(np.concatenate(p)) for p in parts]
    xt = torch.tensor(x, dtype=torch.float32)
    mean, std = xt[idx[0]].mean(), xt[idx[0]].std()
    xt = (xt - mean) / std
    yt = torch.tensor(y, dtype=torch.long)
    return [(xt[i], yt[i]) for i in idx]
