"""Small MNIST models for the sparse-training benchmark, by name.

Every model takes ``(N, 1, 28, 28)`` images and returns ``(N, 10)`` logits:

* ``lenet300100``: LeNet-300-100, 784-300-100-10 MLP with ReLU (the RigL / sparse momentum MNIST model).
* ``mlp1024x3``: 784-1024-1024-1024-10 MLP with ReLU (issue 5's SWAT memory target).
* ``smallcnn``: conv5x5(16)-BN-ReLU-pool, conv5x5(32)-BN-ReLU-pool, fc 512-100-10 (LeNet-5 sized, with BatchNorm).

``build_model(name, seed)`` gives the same initial weights for the same seed.
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
        nn.Conv2d(1, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),     # 16 x 12 x 12
        nn.Conv2d(16, 32, 5), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),    # 32 x 4 x 4
        nn.Flatten(), nn.Linear(512, 100), nn.ReLU(), nn.Linear(100, 10),
    )


def build_model(name: str, seed: int = 0) -> nn.Module:
    """Model ``name`` with weights drawn from ``torch.manual_seed(seed)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}")
    torch.manual_seed(seed)
    return MODELS[name]()
