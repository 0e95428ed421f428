"""Accounting: saved-for-backward bytes (dedup, parameters excluded), training FLOPs, SWAT memory targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from sparsifx import sparsify
from sparsifx.accounting import saved_tensor_bytes, training_cost, training_flops
from sparsifx.masking import set_mask
from sparsifx.tracing import trace


class SinCos(nn.Module):
    def forward(self, x):
        return x.sin() + x.cos()  # sin and cos both save x: one buffer


def test_storage_saved_twice_counted_once():
    x = torch.randn(64, 32, requires_grad=True)
    assert saved_tensor_bytes(SinCos(), (x,)) == x.numel() * 4


def test_parameters_excluded_derived_weight_copies_counted():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)  # so that linear also saves its weight (for x.grad)
    assert saved_tensor_bytes(lin, (x,)) == x.numel() * 4  # input counted, weight (a parameter) not
    # a derived weight (here W * 2) is a new tensor that linear saves for x.grad: it counts
    assert saved_tensor_bytes(DoubledWeightLinear(32, 16), (x,)) == x.numel() * 4 + 16 * 32 * 4
    # masked layers recompute W * mask in backward: only the input is kept (mask = buffer, W = parameter)
    root = nn.Sequential(nn.Linear(32, 16))
    set_mask(root, "0", (torch.rand(16, 32) > 0.5).float())
    assert saved_tensor_bytes(root, (x,)) == x.numel() * 4


class DoubledWeightLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight * 2, self.bias)


def mlp_1024():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def _ratio(net, x, y, recipe):
    dense = trace(net).train()
    gm = sparsify(net, recipe, example_inputs=(x,)).train()
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    return saved_tensor_bytes(gm, (x,), loss) / saved_tensor_bytes(dense, (x,), loss), gm, dense


SWAT90 = {"stages": [{"pass": "swat", "sparsity": 0.9}]}


def test_swat_memory_target_mlp():
    torch.manual_seed(1)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    ratio, gm, dense = _ratio(mlp_1024(), x, y, SWAT90)
    assert ratio <= 0.35, ratio
    cost = training_cost(gm, dense, (x,), lambda out: F.cross_entropy(out, y))
    assert cost.saved_bytes_ratio == pytest.approx(ratio, rel=1e-3)
    f = [784 * 1024, 1024 * 1024, 1024 * 1024, 1024 * 10]  # first layer dense (default exclusion)
    expected = (3 * f[0] + 0.3 * sum(f[1:])) / (3 * sum(f))
    assert cost.flops_ratio == pytest.approx(expected, rel=1e-6)


def test_swat_memory_target_resnet18():
    torch.manual_seed(2)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    ratio, _, _ = _ratio(torchvision.models.resnet18(num_classes=10), x, y, SWAT90)
    assert ratio <= 0.60, ratio


@pytest.mark.slow
def test_swat_memory_target_resnet18_224():
    torch.manual_seed(3)
    x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))
    ratio, _, _ = _ratio(torchvision.models.resnet18(), x, y, SWAT90)
    assert ratio <= 0.60, ratio


def test_training_flops_masked_and_dense_grad_amortised():
    root = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    mask = torch.zeros(20, 10)
    mask.view(-1)[:50] = 1  # density 0.25
    set_mask(root, "0", mask)
    x = torch.randn(4, 10)
    f0, f1 = 2 * 4 * 10 * 20, 2 * 4 * 20 * 5
    tf = training_flops(root, (x,))
    assert tf.dense_training == 3 * (f0 + f1)
    assert tf.training == pytest.approx(3 * 0.25 * f0 + 3 * f1)
    tf = training_flops(root, (x,), dense_grad_every=100)
    assert tf.training == pytest.approx((2 * 0.25 + 0.25 + 0.75 / 100) * f0 + 3 * f1)
    assert math.isclose(tf.ratio, tf.training / tf.dense_training)
