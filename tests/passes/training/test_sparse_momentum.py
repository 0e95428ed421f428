"""Sparse momentum (docs/algorithms.md#sparse-momentum): prune smallest |W|, grow top |momentum|, redistribution,
cosine rate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.errors import PassError, PreconditionError
from sparsifx.passes.training.sparse_momentum import redistribute


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def setup(steps_per_epoch=100, epochs=10, momentum=0.9, **params):
    gm = sparsifx.sparsify(lenet(), {"stages": [{"pass": "sparse_momentum", "sparsity": 0.9, **params}]})
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=momentum, nesterov=momentum > 0)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=steps_per_epoch, epochs=epochs)
    torch.manual_seed(1)
    return gm, opt, ctrl, (torch.randn(64, 64), torch.randint(0, 10, (64,)))


def train(gm, opt, data, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(gm(data[0]), data[1]).backward()
        opt.step()


def test_prune_rate_follows_cosine_annealing_lr():
    gm, opt, ctrl, data = setup(steps_per_epoch=25, epochs=4, prune_rate=0.5)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=100, eta_min=0.005)
    for t in range(101):
        assert ctrl.method.prune_rate_at(ctrl, t) == pytest.approx(sched.get_last_lr()[0], abs=1e-9)
        ref_opt.step()
        sched.step()


def test_truncate_prunes_smallest_grows_top_momentum_new_weights_zero_momentum_kept():
    gm, opt, ctrl, data = setup()
    train(gm, opt, data, 5)
    old = ctrl.masks()
    weights = {n: m.weight.detach().clone() for n, m in ctrl.layers.items()}
    moms = {n: opt.state[m.weight]["momentum_buffer"].clone() for n, m in ctrl.layers.items()}
    rate = ctrl.method.prune_rate_at(ctrl, ctrl.step)
    ctrl.method.on_epoch_end(ctrl, 1)
    for name, module in ctrl.layers.items():
        o, new = old[name].bool(), module.mask.bool()
        n_remove = math.ceil(rate * int(o.sum()))
        kept_ref = torch.zeros(o.numel(), dtype=torch.bool)
        kept_ref[weights[name].abs().masked_fill(~o, -1).flatten().topk(int(o.sum()) - n_remove).indices] = True
        kept_ref = kept_ref.view_as(o)
        assert torch.all(new[kept_ref])  # the kept set survives
        pruned = o & ~kept_ref
        assert weights[name].abs()[pruned].max() <= weights[name].abs()[kept_ref].min()
        grown = new & ~kept_ref
        if grown.any():  # grown = top |momentum| outside the kept set
            outside = moms[name].abs().masked_fill(kept_ref, -1)
            assert outside[grown].min() >= outside[~new & ~kept_ref].max()
        fresh = new & ~o
        assert torch.all(module.weight[fresh] == 0)  # new weights start at 0
        torch.testing.assert_close(opt.state[module.weight]["momentum_buffer"], moms[name])  # never reset
    assert sum(h["grown"] for h in ctrl.history) > 0


def test_total_nonzero_tracks_baseline_over_epochs():
    gm, opt, ctrl, data = setup(steps_per_epoch=4, epochs=6)
    baseline = sum(ctrl.nnz().values())
    assert ctrl.state["baseline_nonzero"] == baseline
    train(gm, opt, data, 24)
    assert len({h["step"] for h in ctrl.history}) == 5  # epochs 1..5, none after the last
    assert abs(sum(ctrl.nnz().values()) - baseline) <= 0.02 * baseline
    assert all(math.isfinite(p.detach().sum().item()) for p in gm.parameters())


def test_redistribution_favours_larger_mean_momentum():
    out = redistribute({"a": 0.75, "b": 0.25}, {"a": 1e6, "b": 1e6}, 1000)
    assert out == {"a": 750, "b": 250}
    capped = redistribute({"a": 0.9, "b": 0.1}, {"a": 100, "b": 1e6}, 1000)
    assert capped["a"] == pytest.approx(99) and capped["b"] == pytest.approx(1000 - 99, abs=1)
    gm, opt, ctrl, data = setup(sparsity=0.5, distribution="uniform")
    train(gm, opt, data, 2)
    with torch.no_grad():  # layer "2" gets a momentum 100x larger than layer "0"
        opt.state[ctrl.layers["2"].weight]["momentum_buffer"].mul_(100.0)
    before = ctrl.nnz()
    ctrl.method.on_epoch_end(ctrl, 1)
    growth = {h["layer"]: h["grown"] for h in ctrl.history}
    assert growth["2"] > growth["0"]
    assert ctrl.nnz()["2"] > before["2"] and ctrl.nnz()["0"] < before["0"]


def test_needs_momentum_and_epochs():
    gm, opt, ctrl, data = setup(momentum=0.0)
    train(gm, opt, data, 1)
    with pytest.raises(PassError, match="momentum"):
        ctrl.method.on_epoch_end(ctrl, 1)
    gm2 = sparsifx.sparsify(lenet(), {"stages": [{"pass": "sparse_momentum"}]})
    with pytest.raises(PreconditionError):
        sparsifx.attach(gm2, torch.optim.SGD(gm2.parameters(), lr=0.1, momentum=0.9), steps_per_epoch=10)


def test_dense_gradient_every_step_and_adam_momentum():
    gm = sparsifx.sparsify(lenet(), {"stages": [{"pass": "sparse_momentum", "sparsity": 0.8}]})
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=3, epochs=3)
    data = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt.zero_grad()
    F.cross_entropy(gm(data[0]), data[1]).backward()
    w = ctrl.layers["0"].weight
    assert int((w.grad != 0).logical_and(ctrl.layers["0"].mask == 0).sum()) > 0  # dense gradient
    opt.step()
    train(gm, opt, data, 5)
    assert len(ctrl.history) > 0
    assert torch.all(w[ctrl.layers["0"].mask == 0] == 0)
    assert ctrl.training_flops()["flops_ratio"] > 1.0 / 3.0  # dense weight gradient is charged
