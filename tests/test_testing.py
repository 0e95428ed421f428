"""sparsifx.testing: the helpers custom-pass authors use to test their passes as sparsifx tests its own."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx.testing import assert_equivalent, eval_mode, n_params, prune_and_shrink, randomize_constants


class ConvBNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


X = (torch.randn(2, 3, 8, 8),)


def _permute_channels_but_not_the_norm(model: ConvBNConv) -> ConvBNConv:
    """A buggy 'pass': reorders a's output channels and b's inputs, forgets the BatchNorm in between."""
    out = copy.deepcopy(model)
    perm = torch.arange(8).flip(0)
    with torch.no_grad():
        out.a.weight.copy_(model.a.weight[perm])
        out.a.bias.copy_(model.a.bias[perm])
        out.b.weight.copy_(model.b.weight[:, perm])
    return out


def test_eval_mode_restores_every_submodules_own_flag_even_on_error():
    model, other = ConvBNConv().train(), nn.Linear(2, 2).eval()
    model.bn.eval()  # a frozen norm inside a training model
    with pytest.raises(RuntimeError), eval_mode(model, other) as modules:
        assert modules == (model, other)
        assert not any(m.training for m in (*model.modules(), other))
        raise RuntimeError("inside")
    assert model.training and model.a.training and not model.bn.training and not other.training


def test_assert_equivalent_passes_on_an_exact_transformation_and_restores_flags():
    torch.manual_seed(0)
    model = ConvBNConv().train()
    gm = sparsifx.trace(model, X)
    expected, actual = assert_equivalent(model, gm, X)
    torch.testing.assert_close(actual, expected)
    assert model.training and gm.training
    assert not torch.all(model.bn.running_var == 1) and torch.equal(model.bn.running_var, gm.bn.running_var)


def test_constants_hide_a_wrong_transformation_unless_rerandomized():
    torch.manual_seed(0)
    model = ConvBNConv()
    buggy = _permute_channels_but_not_the_norm(model)
    assert_equivalent(model, buggy, X, rerandomize=False)  # fresh BatchNorm: the bug is invisible
    with pytest.raises(AssertionError):
        assert_equivalent(model, buggy, X)


def test_randomize_constants_is_identical_by_name_and_skips_other_shapes():
    a, b = ConvBNConv(), ConvBNConv()
    small = nn.Sequential()
    randomize_constants(a, b, seed=3)
    for key in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(a.bn, key), getattr(b.bn, key))
    assert float(a.bn.running_var.min()) >= 0.5 and not torch.equal(a.a.weight, b.a.weight)  # convs untouched
    before = a.bn.running_var.clone()
    randomize_constants(a, small)  # nothing in common: nothing re-drawn
    assert torch.equal(a.bn.running_var, before)


def test_prune_and_shrink_checks_and_returns_the_shrunk_module():
    torch.manual_seed(0)
    model = ConvBNConv()
    randomize_constants(model)
    before = n_params(model)
    gm, masked, out = prune_and_shrink(model, X, 0.5)
    assert n_params(gm) < before and gm.a.out_channels == 4
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
