"""GMP (docs/algorithms.md#gmp): cubic schedule values, pruning every Δt, pruned weights stay pruned."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.passes.training.schedules import gmp_sparsity


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def test_cubic_schedule_values():
    assert gmp_sparsity(0, 0.9, 0.0, 0, 100) == 0.0
    assert gmp_sparsity(25, 0.9, 0.0, 0, 100) == pytest.approx(0.9 - 0.9 * 0.75**3)  # 0.5203125
    assert gmp_sparsity(50, 0.9, 0.0, 0, 100) == pytest.approx(0.7875)
    assert gmp_sparsity(100, 0.9, 0.0, 0, 100) == pytest.approx(0.9)
    assert gmp_sparsity(500, 0.9, 0.0, 0, 100) == pytest.approx(0.9)
    assert gmp_sparsity(5, 0.98, 0.5, 10, 30) == pytest.approx(0.5)  # before t0: s_i
    assert gmp_sparsity(20, 0.98, 0.5, 10, 30) == pytest.approx(0.98 - 0.48 * 0.125)


def test_prunes_every_delta_t_to_the_schedule_and_pruned_stay_pruned():
    gm = sparsifx.sparsify(
        lenet(), {"stages": [{"pass": "gmp", "sparsity": 0.9, "begin_step": 2, "end_step": 12, "frequency": 4}]}
    )
    ctrl = sparsifx.passes.training.controller(gm)
    assert all(ctrl.density(n) == 1.0 for n in ctrl.names)  # starts dense
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ctrl.attach(opt)
    data = torch.randn(32, 64), torch.randint(0, 10, (32,))
    changed = []
    for t in range(16):
        old = ctrl.masks()
        opt.zero_grad()
        F.cross_entropy(gm(data[0]), data[1]).backward()
        opt.step()
        moved = False
        for name, module in ctrl.layers.items():
            o, new = old[name].bool(), module.mask.bool()
            assert torch.all(o | ~new)  # new ⊆ old: never regrown
            if not torch.equal(o, new):
                moved = True
                numel = new.numel()
                assert int(new.sum()) == numel - round(ctrl.method.sparsity_at(ctrl, name, t) * numel)
                w = module.weight.detach()  # after the step: pruned are the smallest |W| then
                assert w.abs()[o & ~new].max() <= w.abs()[new].min() + 1e-12
            assert torch.all(module.weight[~new] == 0)
        if moved:
            changed.append(t)
    assert changed == [6, 10, 12]  # t0+Δt, … and t_end itself (at t0, s_t = s_i = 0 prunes nothing)
    assert sorted({h["step"] for h in ctrl.history}) == [7, 11, 13]  # recorded after the step counter moved
    for name in ctrl.names:
        assert ctrl.density(name) == pytest.approx(0.1, abs=1e-3)
    assert ctrl.training_flops()["flops_ratio"] < 1.0


def test_end_fraction_needs_epochs():
    gm = sparsifx.sparsify(lenet(), {"stages": [{"pass": "gmp", "sparsity": 0.8, "frequency": 2}]})
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    with pytest.raises(sparsifx.PreconditionError):
        sparsifx.attach(gm, opt)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=4, epochs=2)
    assert ctrl.method.schedule(ctrl).t_end == 6  # 0.75 · 8
