"""Model factories for the CLI table test (``--model python:cli_models:<name>``)."""

import torch.nn as nn


def tiny():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def raises():
    raise ValueError("factory failed")


def not_a_module():
    return 3
