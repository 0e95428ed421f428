"""``sparsify`` keeps every submodule's own ``training`` flag: the user's model is left as it was, and the
returned module has, under each name it shares with the user's model, the flag the user set (a fine-tuning
model in ``train()`` with frozen BatchNorms comes back with those BatchNorms still frozen)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import sparsifx.api as api
from sparsifx import PassBase, PassResult, sparsify
from sparsifx.pass_manager import run_model
from sparsifx.registry import PASSES
from sparsifx.tracing import record_shapes, trace

X = torch.randn(4, 3, 10, 10)
FROZEN = ("bn1", "bn3")
RECIPES = {
    "channel_prune+shrink": {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]},
    "taylor+shrink": {"stages": [{"pass": "channel_prune", "ratio": 0.5, "importance": "taylor"}, {"pass": "shrink"}]},
    "magnitude": {"stages": [{"pass": "magnitude", "sparsity": 0.5}]},
}


class FineTune(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


def fine_tune_model() -> nn.Module:
    """Training mode, BatchNorms bn1 and bn3 frozen (eval) with non-trivial running statistics."""
    torch.manual_seed(0)
    model = FineTune()
    for name in FROZEN:
        bn = model.get_submodule(name)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.train()
    for name in FROZEN:
        model.get_submodule(name).eval()
    return model


def flags(module: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


@pytest.fixture(params=[True, False], ids=["safety_net", "no_safety_net"])
def safety_net(request, monkeypatch):
    """Without the final restore in ``sparsify``, the passes and analyses alone must keep the flags."""
    if not request.param:
        monkeypatch.setattr(api, "_keep_training_flags", lambda gm, user_flags: None)
    return request.param


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no_verify"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_sparsify_keeps_every_training_flag(recipe, verify, safety_net, caplog):
    model = fine_tune_model()
    before = flags(model)
    assert before[""] and not before["bn1"] and before["bn2"] and not before["bn3"]
    with caplog.at_level(logging.WARNING, logger="sparsifx.api"):
        gm = sparsify(model, RECIPES[recipe], example_inputs=(X,), verify=verify)
    assert not caplog.records  # the safety net had nothing to restore
    assert flags(model) == before
    after = flags(gm)
    shared = [name for name in before if name in after]
    assert set(FROZEN) | {"", "bn2", "conv1", "head"} <= set(shared)
    assert {n: after[n] for n in shared} == {n: before[n] for n in shared}

    stats = {
        name: (gm.get_submodule(name).running_mean.clone(), gm.get_submodule(name).running_var.clone())
        for name in ("bn1", "bn2", "bn3")
    }
    with torch.no_grad():
        gm(X)  # a training-mode forward: frozen BatchNorms use and keep their running statistics
    for name in FROZEN:
        mean, var = stats[name]
        assert torch.equal(gm.get_submodule(name).running_mean, mean)
        assert torch.equal(gm.get_submodule(name).running_var, var)
    assert not torch.equal(gm.bn2.running_mean, stats["bn2"][0])  # the unfrozen one really is in train mode


def test_record_shapes_and_run_model_keep_each_flag():
    gm = trace(fine_tune_model())
    before = flags(gm)
    record_shapes(gm, (X,))
    run_model(gm, (X,))
    assert flags(gm) == before


class TrainAll(PassBase):
    """A careless custom pass: ``gm.train()`` resets every submodule to train mode."""

    in_place = True

    def call(self, gm):
        gm.train()
        return PassResult(gm, False)


def test_safety_net_restores_a_flag_a_pass_flipped(caplog, monkeypatch):
    """What a pass flips is put back by name in the returned module, and logged."""
    monkeypatch.setitem(PASSES._items, "test_flags_train_all", TrainAll)
    with caplog.at_level(logging.WARNING, logger="sparsifx.api"):
        gm = sparsify(fine_tune_model(), {"stages": [{"pass": "test_flags_train_all"}]}, example_inputs=(X,))
    assert not gm.bn1.training and not gm.bn3.training and gm.bn2.training
    assert any("'bn1'" in r.getMessage() for r in caplog.records)
