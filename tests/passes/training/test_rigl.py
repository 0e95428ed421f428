"""RigL (docs/algorithms.md#rigl): schedule, exact nnz, zero-init of new connections, skipped steps, top-|g| growth."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.errors import PreconditionError, RecipeError
from sparsifx.passes.training.rigl import RigL
from sparsifx.passes.training.schedules import cosine_drop_fraction


def lenet(inputs: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def setup(opt_cls=torch.optim.SGD, **params):
    gm = sparsifx.sparsify(lenet(), {"stages": [{"pass": "rigl", "sparsity": 0.9, **params}]})
    opt = opt_cls(gm.parameters(), lr=0.05, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {}))
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=10, epochs=10)
    torch.manual_seed(1)
    data = torch.randn(64, 64), torch.randint(0, 10, (64,))
    return gm, opt, ctrl, data


def backward(gm, opt, data):
    opt.zero_grad()
    F.cross_entropy(gm(data[0]), data[1]).backward()


def test_cosine_drop_fraction_vector():
    expected = {0: 0.300, 12500: 0.256, 25000: 0.150, 37500: 0.044}
    for t, value in expected.items():
        assert round(cosine_drop_fraction(0.3, t, 50000, 0), 3) == value
    gm, opt, ctrl, _ = setup(drop_fraction=0.3, end_step=50000)
    method = ctrl.method
    assert [round(method.drop_fraction_at(ctrl, t), 3) for t in expected] == list(expected.values())
    assert method.drop_fraction_at(ctrl, 60000) == pytest.approx(0.0)


def test_nnz_constant_and_mask_changes_only_on_scheduled_steps():
    gm, opt, ctrl, data = setup(delta_t=3, begin_step=2, end_step=14)
    nnz0 = ctrl.nnz()
    changed_at = []
    for t in range(18):
        before = ctrl.masks()
        backward(gm, opt, data)
        opt.step()
        assert ctrl.nnz() == nnz0
        if any(not torch.equal(before[n], m) for n, m in ctrl.masks().items()):
            changed_at.append(t)
    assert changed_at == [2, 5, 8, 11]
    # step 14 = T_end is still an update step, but α_14 = 0 (cosine fed the global step): nothing moves
    assert {h["step"] for h in ctrl.history} == {2, 5, 8, 11, 14}
    assert all(h["grown"] == 0 for h in ctrl.history if h["step"] == 14)


def test_zero_drop_fraction_leaves_mask_unchanged_but_still_skips_the_step():
    gm, opt, ctrl, data = setup(drop_fraction=0.0, delta_t=2, end_step=10)
    before = ctrl.masks()
    w_before = {n: m.weight.detach().clone() for n, m in ctrl.layers.items()}
    backward(gm, opt, data)
    opt.step()  # t=0 is an update step
    for name, module in ctrl.layers.items():
        torch.testing.assert_close(module.mask, before[name], rtol=0, atol=0)
        torch.testing.assert_close(module.weight, w_before[name], rtol=0, atol=0)


def test_update_step_skips_the_optimizer_and_normal_steps_do_not():
    gm, opt, ctrl, data = setup(opt_cls=torch.optim.Adam, delta_t=4, begin_step=1, end_step=20)
    bias = gm.get_submodule("2").bias
    backward(gm, opt, data)
    opt.step()  # t=0: ordinary step
    assert int(opt.state[bias]["step"]) == 1
    b0 = bias.detach().clone()
    backward(gm, opt, data)
    opt.step()  # t=1: update step, optimizer skipped
    assert int(opt.state[bias]["step"]) == 1
    torch.testing.assert_close(bias.detach(), b0, rtol=0, atol=0)
    assert bias.grad is not None  # gradients are given back after the skipped step
    backward(gm, opt, data)
    opt.step()  # t=2: ordinary again
    assert int(opt.state[bias]["step"]) == 2
    assert not torch.equal(bias.detach(), b0)


def test_new_connections_start_with_zero_weight_and_zero_momentum():
    gm, opt, ctrl, data = setup(delta_t=5, begin_step=1, end_step=20)
    backward(gm, opt, data)
    opt.step()  # t=0 ordinary: creates momentum buffers
    with torch.no_grad():
        for module in ctrl.layers.values():
            opt.state[module.weight]["momentum_buffer"].fill_(1.0)
            module.weight.add_((1 - module.mask) * 0.5)  # junk where inactive; forward ignores it
    old = ctrl.masks()
    backward(gm, opt, data)
    opt.step()  # t=1 update
    grown_total = 0
    for name, module in ctrl.layers.items():
        new = module.mask.bool() & ~old[name].bool()
        grown_total += int(new.sum())
        assert torch.all(module.weight[new] == 0)
        mom = opt.state[module.weight]["momentum_buffer"]
        assert torch.all(mom[new] == 0)
        assert torch.all(mom[~new] == 1.0)  # the step was skipped: other slots untouched
        assert torch.all(module.weight[~module.mask.bool()] == 0)
    assert grown_total > 0


def test_grown_set_is_top_gradient_outside_kept(monkeypatch):
    monkeypatch.setattr("sparsifx.passes.training.drop.NOISE_STD", 0.0)
    gm, opt, ctrl, data = setup(delta_t=10, end_step=100, drop_fraction=0.3)
    old = ctrl.masks()
    weights = {n: m.weight.detach().clone() for n, m in ctrl.layers.items()}
    backward(gm, opt, data)
    for module in ctrl.layers.values():
        assert module.dense_grad
    grads = {n: m.weight.grad.detach().clone() for n, m in ctrl.layers.items()}
    alpha = ctrl.method.drop_fraction_at(ctrl, 0)
    opt.step()
    for name, module in ctrl.layers.items():
        nnz = int(old[name].sum())
        n_drop = math.floor(nnz * alpha)
        score = weights[name].abs().masked_fill(~old[name].bool(), -1.0).flatten()
        kept = torch.zeros(score.numel(), dtype=torch.bool)
        kept[score.topk(nnz - n_drop).indices] = True
        g = grads[name].abs().flatten().masked_fill(kept, -1.0)
        grown = torch.zeros_like(kept)
        grown[g.topk(n_drop).indices] = True
        assert torch.equal(module.mask.bool().flatten(), kept | grown)
        assert int((grads[name] != 0).logical_and(~old[name].bool()).sum()) > 0  # gradient was dense
    assert not any(m.dense_grad for m in ctrl.layers.values())  # next step is no update step


def test_training_flops_amortise_the_dense_gradient():
    gm, opt, ctrl, data = setup(delta_t=4, end_step=100)
    for _ in range(8):
        backward(gm, opt, data)
        opt.step()
    dens = ctrl.summary()["density"]
    macs = {"0": 64 * 64 * 300, "2": 64 * 300 * 100, "4": 64 * 100 * 10}
    d = {n: dens.get(n, 1.0) for n in macs}
    upd, plain = 2, 6  # steps 0 and 4 compute the dense weight gradient
    expected = sum(2 * m * (upd * (2 * d[n] + 1) + plain * 3 * d[n]) for n, m in macs.items())
    flops = ctrl.training_flops()
    assert flops["training_flops"] == pytest.approx(expected)
    assert flops["dense_training_flops"] == pytest.approx(sum(2 * m * 3 * 8 for m in macs.values()))
    assert 0.1 < flops["flops_ratio"] < 1.0


def test_recipe_errors_and_missing_end():
    with pytest.raises(RecipeError) as err:
        sparsifx.Recipe.from_dict({"stages": [{"pass": "rigl", "drop_fraction": 1.5}]})
    assert err.value.path == "stages[0].drop_fraction"
    with pytest.raises(RecipeError):
        sparsifx.Recipe.from_dict({"stages": [{"pass": "rigl", "distribution": "gaussian"}]})
    gm = sparsifx.sparsify(lenet(), {"stages": [{"pass": "rigl"}]})
    with pytest.raises(PreconditionError):
        sparsifx.attach(gm, torch.optim.SGD(gm.parameters(), lr=0.1))  # no end_step, no epochs
    assert isinstance(RigL.from_params({"sparsity": 0.8, "delta_t": 7}), RigL)


def test_uniform_keeps_first_layer_dense_and_erk_on_resnet18():
    gm = sparsifx.sparsify(lenet(), {"stages": [{"pass": "rigl", "distribution": "uniform", "sparsity": 0.9}]})
    ctrl = sparsifx.passes.training.controller(gm)
    assert ctrl.names == ["2", "4"] and all(abs(ctrl.density(n) - 0.1) < 1e-3 for n in ctrl.names)
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    gm = sparsifx.sparsify(net, {"stages": [{"pass": "rigl", "sparsity": 0.9, "delta_t": 1, "end_step": 10}]})
    gm.graph.lint()
    ctrl = sparsifx.passes.training.controller(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    ctrl.attach(opt)
    total = sum(m.weight.numel() for m in ctrl.layers.values())
    assert sum(ctrl.nnz().values()) / total == pytest.approx(0.1, abs=0.02)
    nnz0 = ctrl.nnz()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    before = ctrl.masks()
    opt.zero_grad()
    F.cross_entropy(gm(x), y).backward()
    opt.step()
    assert ctrl.nnz() == nnz0
    assert any(not torch.equal(before[n], m) for n, m in ctrl.masks().items())
