"""SET (docs/algorithms.md#set): ζ removal around zero by sign, random regrowth into empty positions, no gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.distributions import er_epsilon_density
from sparsifx.passes.training.drop import set_thresholds


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


def setup(**params):
    gm = sparsifx.sparsify(mlp(), {"stages": [{"pass": "set", "epsilon": 10, **params}]})
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=3, epochs=4)
    torch.manual_seed(1)
    return gm, opt, ctrl, (torch.randn(32, 64), torch.randint(0, 10, (32,)))


def train(gm, opt, data, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(gm(data[0]), data[1]).backward()
        opt.step()


def test_er_epsilon_masks_and_dense_output_layer():
    gm, opt, ctrl, data = setup()
    assert ctrl.names == ["0", "2"]  # 200->10 has p = 10·210/2000 > 1: dense, not controlled
    for name in ctrl.names:
        w = gm.get_submodule(name).weight
        p = er_epsilon_density(tuple(w.shape), 10)
        assert ctrl.density(name) == pytest.approx(p, abs=4 * (p * (1 - p) / w.numel()) ** 0.5)
        assert not gm.get_submodule(name).dense_grad


def test_evolution_removes_exactly_the_values_between_thresholds_and_regrows_into_empty_positions():
    gm, opt, ctrl, data = setup(evolve_last=True, grow_init="normal")
    train(gm, opt, data, 2)
    for p in gm.parameters():
        p.grad = None  # SET reads no gradient
    old = ctrl.masks()
    weights = {n: m.weight.detach().clone() for n, m in ctrl.layers.items()}
    moms = {n: opt.state[m.weight]["momentum_buffer"] for n, m in ctrl.layers.items()}
    ctrl.method.on_epoch_end(ctrl, 1)
    for name, module in ctrl.layers.items():
        o, new = old[name].bool(), module.mask.bool()
        w = weights[name]
        neg_thr, pos_thr = set_thresholds(w[o], 0.3)
        removed_ref = o & (w >= neg_thr) & (w <= pos_thr)
        keep = o & ~removed_ref
        n_neg = int((w[o] < 0).sum())
        assert int((removed_ref & (w < 0)).sum()) == n_neg - int(0.7 * n_neg)  # ζ of the negatives
        assert int(new.sum()) == int(o.sum())  # nnz constant
        assert torch.all(new[keep])
        grown = new & ~keep
        assert int(grown.sum()) == int(removed_ref.sum())
        assert torch.all(module.weight[grown] != 0)  # normal init N(0,1)/10
        assert float(module.weight.detach()[grown].std()) == pytest.approx(0.1, rel=0.3)
        torch.testing.assert_close(module.weight[keep], w[keep])
        assert torch.all(moms[name][grown] == 0)  # optimizer slots of new connections reset
        assert torch.all(module.weight[~new] == 0)
        assert int((grown & ~o).sum()) > 0  # some really new positions
    assert all(p.grad is None for p in gm.parameters())


def test_output_layer_not_evolved_by_default_and_schedule_per_epoch():
    gm = sparsifx.sparsify(
        mlp(), {"stages": [{"pass": "set", "distribution": "uniform", "sparsity": 0.8, "dense_first_layer": False}]}
    )
    ctrl = sparsifx.passes.training.controller(gm)
    assert ctrl.names == ["0", "2", "4"]
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    ctrl.attach(opt, steps_per_epoch=3, epochs=4)
    last = ctrl.masks()["4"]
    train(gm, opt, (torch.randn(32, 64), torch.randint(0, 10, (32,))), 12)
    assert sorted({h["step"] for h in ctrl.history}) == [3, 6, 9]  # epoch ends except the last
    assert {h["layer"] for h in ctrl.history} == {"0", "2"}
    assert torch.equal(ctrl.masks()["4"], last)
    assert ctrl.training_flops()["flops_ratio"] < 0.5


def test_set_on_a_small_cnn_with_zero_init():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    gm = sparsifx.sparsify(net, {"stages": [{"pass": "set", "distribution": "erk", "sparsity": 0.7}]})
    gm.graph.lint()
    ctrl = sparsifx.passes.training.controller(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    ctrl.attach(opt, steps_per_epoch=2, epochs=3)
    nnz = ctrl.nnz()
    old = ctrl.masks()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    train(gm, opt, (x, y), 2)
    assert ctrl.nnz() == nnz
    changed = [n for n in ctrl.names if not torch.equal(old[n], ctrl.masks()[n])]
    assert changed and "6" not in changed
    for name in changed:
        new = ctrl.layers[name].mask.bool() & ~old[name].bool()
        assert torch.all(ctrl.layers[name].weight[new] == 0)


def test_manual_epoch_end_without_steps_per_epoch():
    gm = sparsifx.sparsify(mlp(), {"stages": [{"pass": "set", "epsilon": 10}]})
    ctrl = sparsifx.passes.training.controller(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    ctrl.attach(opt)
    train(gm, opt, (torch.randn(32, 64), torch.randint(0, 10, (32,))), 3)
    assert ctrl.history == []  # no epoch boundaries known
    ctrl.epoch_end()
    assert {h["layer"] for h in ctrl.history} == {"0", "2"}
    ctrl.attach(opt, steps_per_epoch=3)
    with pytest.raises(sparsifx.PreconditionError):
        ctrl.epoch_end()
