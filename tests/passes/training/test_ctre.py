"""CTRE (docs/algorithms.md#ctre): cosine scores, CTE/CTRE_sim/CTRE_seq growth, no dense gradient needed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.passes.training.cosine import CosineStats


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


def setup(**params):
    gm = sparsifx.sparsify(mlp(), {"stages": [{"pass": "ctre", "epsilon": 10, **params}]})
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    data = torch.randn(64, 64), torch.randint(0, 10, (64,))
    return gm, opt, data


def train(gm, opt, data, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(gm(data[0]), data[1]).backward()
        opt.step()


def test_cosine_scores_shape_range_identical_and_orthogonal_columns():
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3))
    gm = sparsifx.trace(net)
    stats = CosineStats(gm, ["0", "2"]).install()
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [2.0, 0.0, 0.5]])  # columns 0 and 1 orthogonal
    gm(x[:2])
    gm(x[2:])  # streamed over two batches
    s = stats.scores()
    assert s["0"].shape == (3, 3) and s["2"].shape == (2, 3)
    assert torch.all((s["0"] >= 0) & (s["0"] <= 1)) and torch.all((s["2"] >= 0) & (s["2"] <= 1))
    torch.testing.assert_close(torch.diagonal(s["0"]), torch.ones(3))  # identical columns (W = I, ReLU)
    assert s["0"][0, 1] == 0 and s["0"][1, 0] == 0  # orthogonal columns
    a_in, a_out = torch.relu(x), torch.softmax(net(x), dim=1)  # output layer: softmax probabilities
    ref = (a_out.t() @ a_in).abs() / (a_out.norm(dim=0)[:, None] * a_in.norm(dim=0)[None, :])
    torch.testing.assert_close(s["2"], ref)


def _fixed_scores(ctrl, monkeypatch, favour_dropped: bool):
    """Replace the activation scores by a fixed S that (optionally) favours the active weights."""
    scores = {}
    for name, module in ctrl.layers.items():
        s = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.5
        if favour_dropped:
            s = s + module.mask  # active (and so just-dropped) positions score highest: collisions
        scores[name] = s
    monkeypatch.setattr(ctrl.state["_stats"], "scores", lambda: scores)
    return scores


@pytest.mark.parametrize("variant", ["cte", "sim"])
def test_growth_is_top_cosine_outside_kept_and_sim_replaces_collisions(variant, monkeypatch):
    monkeypatch.setattr("sparsifx.passes.training.drop.NOISE_STD", 0.0)
    gm, opt, data = setup(variant=variant, zeta=0.2)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=1000, epochs=2)
    train(gm, opt, data, 2)
    for p in gm.parameters():
        p.grad = None  # no gradient at all
    scores = _fixed_scores(ctrl, monkeypatch, favour_dropped=True)
    old = ctrl.masks()
    weights = {n: m.weight.detach().clone() for n, m in ctrl.layers.items()}
    ctrl.method.on_epoch_end(ctrl, 1)
    for name, module in ctrl.layers.items():
        o, new = old[name].bool(), module.mask.bool()
        n_drop = math.floor(0.2 * int(o.sum()))
        keep = torch.zeros(o.numel(), dtype=torch.bool)
        keep[weights[name].abs().masked_fill(~o, -1).flatten().topk(int(o.sum()) - n_drop).indices] = True
        keep = keep.view_as(o)
        cos = torch.zeros(o.numel(), dtype=torch.bool)
        cos[scores[name].masked_fill(keep, -1).flatten().topk(n_drop).indices] = True
        cos = cos.view_as(o)
        assert int(new.sum()) == int(o.sum())  # nnz constant
        assert torch.all(new[keep])
        collided = cos & o & ~keep
        assert int(collided.sum()) > 0
        if variant == "cte":
            assert torch.equal(new, keep | cos)
        else:
            rand = new & ~keep & ~cos
            assert torch.equal(new & cos, cos & ~collided)
            assert int(rand.sum()) == int(collided.sum())  # |random part| == #collisions
    assert all(p.grad is None for p in gm.parameters())
    assert not any(m.dense_grad for m in ctrl.layers.values())


def test_train_mode_accumulates_from_training_forwards_and_skips_until_scores_exist():
    gm, opt, data = setup()
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=3, epochs=3)
    old = ctrl.masks()
    ctrl.method.on_epoch_end(ctrl, 0)  # no training forward yet: no scores, no update
    assert ctrl.history == [] and all(torch.equal(old[n], m) for n, m in ctrl.masks().items())
    train(gm, opt, data, 6)
    assert sorted({h["step"] for h in ctrl.history}) == [3, 6]  # ends of epochs 1 and 2 (not 3, the last)
    assert set(ctrl.state["cosine"]) == set(ctrl.names)
    assert ctrl.nnz() == {n: int(m.sum()) for n, m in old.items()}


def test_data_mode_runs_an_extra_pass_and_charges_its_forward_flops():
    gm, opt, data = setup(activations="data")
    loader = [(data[0][i : i + 16], data[1][i : i + 16]) for i in range(0, 64, 16)]
    with pytest.raises(sparsifx.PreconditionError):
        sparsifx.attach(gm, opt, steps_per_epoch=2, epochs=3)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=2, epochs=3, data=loader)
    train(gm, opt, data, 4)
    assert sorted({h["step"] for h in ctrl.history}) == [2, 4]
    flops = ctrl.training_flops()
    assert flops["extra_forward_flops"] > 0
    assert gm.training


def test_seq_switches_to_random_growth_after_no_improvement(monkeypatch):
    gm, opt, data = setup(variant="seq", early_stop_epoch=2)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=1000, epochs=5)
    train(gm, opt, data, 1)
    for metric in (0.5, 0.6, 0.55, 0.58):
        ctrl.observe(metric)
    assert ctrl.method.random_phase(ctrl)  # best at epoch 2, two epochs without improvement
    monkeypatch.setattr(ctrl.state["_stats"], "scores", lambda: pytest.fail("cosine scores used in random phase"))
    nnz = ctrl.nnz()
    ctrl.method.on_epoch_end(ctrl, 1)
    assert ctrl.state["ctre_random"] and ctrl.nnz() == nnz and ctrl.history


def test_ctre_on_a_small_cnn_and_unsupported_layers():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    gm = sparsifx.sparsify(net, {"stages": [{"pass": "ctre", "distribution": "erk", "sparsity": 0.7}]})
    ctrl = sparsifx.passes.training.controller(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    ctrl.attach(opt, steps_per_epoch=2, epochs=2)
    nnz = ctrl.nnz()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    train(gm, opt, (x, y), 2)
    assert ctrl.nnz() == nnz and {h["layer"] for h in ctrl.history} == set(ctrl.names)
    for name, s in ctrl.state["cosine"].items():
        assert s.shape == ctrl.layers[name].weight.shape and 0 <= float(s.min()) and float(s.max()) <= 1
    conv1d = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 2))
    with pytest.raises(sparsifx.UnsupportedOpError, match="'0'"):
        sparsifx.sparsify(
            conv1d,
            {"stages": [{"pass": "ctre", "types": ["Conv1d", "Linear"], "sparsity": 0.5, "distribution": "uniform"}]},
        )


def test_activation_statistics_are_charged_as_dense_products():
    gm, opt, data = setup()
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=3, epochs=3)
    assert sorted(ctrl.names) == ["0", "2"]  # the 200->10 output layer is dense at epsilon 10
    train(gm, opt, data, 1)
    # one training forward of batch 64: A_out^T A_in for 64->200 and 200->200
    assert ctrl.training_flops()["extra_forward_flops"] == 2 * 64 * (64 * 200 + 200 * 200)
