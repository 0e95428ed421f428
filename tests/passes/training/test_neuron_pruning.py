"""Hidden-neuron importance pruning (docs/algorithms.md#neuron-importance-pruning): I_j = Σ_i |W_ji|, neurons
with I <= percentile(I, q) are removed physically from their layer (rows) and the next (columns); optimizer
state follows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.errors import RecipeError
from sparsifx.masking import set_mask
from sparsifx.passes.all_relu import AllReLU
from sparsifx.passes.training.neuron_pruning import (
    NeuronPruning,
    hidden_layers,
    importance,
    kept_neurons,
    prune_neurons,
)
from sparsifx.sparse_linear import SparseLinear, is_sparse_storage

PRUNE = {"every_epochs": 2, "percentile": 20, "after": 1}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def setup(storage: str, optimizer: str = "sgd", **stage):
    stages = [
        {"pass": "all_relu"},
        {
            "pass": "set",
            "distribution": "uniform",
            "sparsity": 0.5,
            "dense_first_layer": False,
            "storage": storage,
            **stage,
        },
    ]
    gm = sparsifx.sparsify(mlp(), {"stages": stages})
    opt = (
        torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(gm.parameters(), lr=0.01)
    )
    torch.manual_seed(1)
    return gm, opt, (torch.randn(32, 8), torch.randint(0, 3, (32,)))


def train(gm, opt, data, steps):
    gm.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(gm(data[0]), data[1]).backward()
        opt.step()


def dense_weight(module) -> torch.Tensor:
    if is_sparse_storage(module):
        return module.to_dense_weight()
    return (module.weight * module.mask).detach() if hasattr(module, "mask") else module.weight.detach()


def zeroed_reference(gm, removed: dict[str, torch.Tensor]) -> nn.Sequential:
    """The unshrunk model with the removed neurons' incoming rows and outgoing columns zeroed (dense, plain)."""
    layers = []
    for name in ("0", "1", "2", "3", "4", "5"):
        module = gm.get_submodule(name)
        if not (isinstance(module, nn.Linear) or is_sparse_storage(module)):
            layers.append(copy.deepcopy(module))
            continue
        w, b = dense_weight(module).clone(), module.bias.detach().clone()
        out = nn.Linear(w.shape[1], w.shape[0])
        if name in removed:
            w[removed[name]] = 0
        previous = {"2": "0", "5": "2"}.get(name)
        if previous in removed:
            w[:, removed[previous]] = 0
        out.weight.data.copy_(w)
        out.bias.data.copy_(b)
        layers.append(out)
    return nn.Sequential(*layers)


def test_importance_is_the_sum_of_absolute_incoming_weights():
    torch.manual_seed(0)
    linear = nn.Linear(5, 4)
    mask = torch.rand(4, 5) < 0.6
    w = linear.weight.detach().clone()
    expected = (w * mask).abs().sum(1).double()
    masked = set_mask(nn.Sequential(copy.deepcopy(linear)), "0", mask)
    torch.testing.assert_close(importance(masked), expected)
    keys = mask.flatten().nonzero().squeeze(1)
    torch.testing.assert_close(importance(SparseLinear.from_dense(linear, keys)), expected)
    torch.testing.assert_close(importance(linear), w.abs().sum(1).double())
    hand = nn.Linear(3, 2, bias=False)
    hand.weight.data = torch.tensor([[1.0, -2.0, 0.5], [0.0, -0.25, 0.0]])
    torch.testing.assert_close(importance(hand), torch.tensor([3.5, 0.25], dtype=torch.float64))


def test_threshold_is_numpys_linear_percentile_and_one_neuron_always_stays():
    scores = torch.tensor([0.3, 0.1, 0.7, 0.2, 0.9, 0.5, 0.4], dtype=torch.float64)
    keep, t = kept_neurons(scores, 20)
    assert t == pytest.approx(np.percentile(scores.numpy(), 20))
    assert keep.tolist() == (scores.numpy() > np.percentile(scores.numpy(), 20)).tolist()
    keep, _ = kept_neurons(torch.zeros(5, dtype=torch.float64), 20)
    assert int(keep.sum()) == 1


def test_schedule_and_its_validation():
    s = NeuronPruning.from_dict({"every_epochs": 10, "percentile": 20, "after": 200, "until": 240})
    assert [e for e in range(1, 300) if s.due(e)] == [210, 220, 230, 240]
    assert NeuronPruning.from_dict({}) == NeuronPruning() and NeuronPruning().to_dict()["until"] is None
    assert NeuronPruning.from_dict(None) is None
    pass_ = sparsifx.Recipe.from_dict({"stages": [{"pass": "set"}]}).stages[0].build()
    assert pass_.neuron_pruning is None  # off by default
    built = sparsifx.Recipe.from_dict({"stages": [{"pass": "rigl", "neuron_pruning": PRUNE}]}).stages[0].build()
    assert built.neuron_pruning == NeuronPruning(2, 20.0, 1, None)
    assert built.set_neuron_pruning(None).neuron_pruning is None


@pytest.mark.parametrize(
    "value, path",
    [
        (5, "stages[0].neuron_pruning"),
        ({"every": 1}, "stages[0].neuron_pruning.every"),
        ({"every_epochs": 0}, "stages[0].neuron_pruning.every_epochs"),
        ({"every_epochs": 1.5}, "stages[0].neuron_pruning.every_epochs"),
        ({"percentile": 100}, "stages[0].neuron_pruning.percentile"),
        ({"percentile": 0}, "stages[0].neuron_pruning.percentile"),
        ({"percentile": "20"}, "stages[0].neuron_pruning.percentile"),
        ({"after": -1}, "stages[0].neuron_pruning.after"),
        ({"after": 10, "until": 5}, "stages[0].neuron_pruning.until"),
        ({"until": True}, "stages[0].neuron_pruning.until"),
    ],
)
def test_bad_schedules_raise_recipe_errors_at_their_key(value, path):
    with pytest.raises(RecipeError) as info:
        sparsifx.Recipe.from_dict({"stages": [{"pass": "set", "neuron_pruning": value}]})
    assert info.value.path == path


@pytest.mark.parametrize("storage", ["masked", "sparse"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_shrunk_model_equals_the_zeroed_one_and_training_goes_on(storage, optimizer):
    gm, opt, data = setup(storage, optimizer)
    ctrl = sparsifx.attach(gm, opt)
    train(gm, opt, data, 3)
    assert set(hidden_layers(ctrl)[0]) == {"0", "2"}
    scores = {n: importance(gm.get_submodule(n)).numpy() for n in ("0", "2")}
    removed = {n: torch.from_numpy(s <= np.percentile(s, 20)) for n, s in scores.items()}
    reference = zeroed_reference(gm, removed).eval()
    kept = {n: ~r for n, r in removed.items()}
    old_w = {n: dense_weight(gm.get_submodule(n)).clone() for n in ("0", "2", "5")}
    old_slot = {}
    for n in ("0", "2"):
        module = gm.get_submodule(n)
        p = module.values if is_sparse_storage(module) else module.weight
        key = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
        slot = torch.zeros(module.out_features * module.in_features)
        slot[module.keys() if is_sparse_storage(module) else torch.arange(slot.numel())] = opt.state[p][key].flatten()
        old_slot[n] = (key, slot.view(module.out_features, module.in_features))

    records = prune_neurons(ctrl, 20)

    assert [(r["layer"], r["removed"], r["out_features"], r["kind"]) for r in records] == [
        (n, int(removed[n].sum()), int(kept[n].sum()), "neuron_pruning") for n in ("0", "2")
    ]
    assert all(r["removed"] >= 3 for r in records)  # ≈ 20 % of 16
    l0, l2, l5 = (gm.get_submodule(n) for n in ("0", "2", "5"))
    assert (l0.out_features, l2.in_features, l2.out_features, l5.in_features) == (
        int(kept["0"].sum()),
        int(kept["0"].sum()),
        int(kept["2"].sum()),
        int(kept["2"].sum()),
    )
    assert l0.bias.shape == (l0.out_features,)
    torch.testing.assert_close(dense_weight(l0), old_w["0"][kept["0"]])
    torch.testing.assert_close(dense_weight(l2), old_w["2"][kept["2"]][:, kept["0"]])
    torch.testing.assert_close(dense_weight(l5), old_w["5"][:, kept["2"]])
    for n, rows, cols in (("0", kept["0"], None), ("2", kept["2"], kept["0"])):
        module = gm.get_submodule(n)
        p = module.values if is_sparse_storage(module) else module.weight
        key, slot = old_slot[n]
        slot = slot[rows] if cols is None else slot[rows][:, cols]
        got = opt.state[p][key]
        torch.testing.assert_close(got, slot[module.rows(), module.col.long()] if is_sparse_storage(module) else slot)
    gm.eval()
    x = torch.randn(10, 8)
    torch.testing.assert_close(gm(x), reference(x))
    gm.graph.lint()

    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in gm.parameters()}
    train(gm, opt, data, 3)
    for p in gm.parameters():
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.dim():
                assert value.shape == p.shape
    assert torch.isfinite(gm(x)).all()


@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_schedule_runs_before_the_methods_own_epoch_end_update(storage):
    gm, opt, data = setup(storage, neuron_pruning=PRUNE)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=2, epochs=6)
    train(gm, opt, data, 12)
    kinds = [(h["step"], h["kind"]) for h in ctrl.history]
    pruned_at = sorted({s for s, k in kinds if k == "neuron_pruning"})
    assert pruned_at == [6, 10]  # ends of epochs 3 and 5 (after 1, every 2)
    for step in pruned_at:
        at_step = [k for s, k in kinds if s == step]
        assert at_step.index("set") > max(i for i, k in enumerate(at_step) if k == "neuron_pruning")
    sizes = [h["out_features"] for h in ctrl.history if h["kind"] == "neuron_pruning" and h["layer"] == "0"]
    assert sizes[0] < 16 and sizes[1] < sizes[0]
    assert gm.get_submodule("0").out_features == sizes[-1] == gm.get_submodule("2").in_features
    assert gm(data[0]).shape == (32, 3)


def test_layers_whose_output_is_not_a_chain_to_a_linear_are_skipped(caplog):
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
            self.act = AllReLU(-0.6)

        def forward(self, x):
            h = self.act(self.a(x))
            return self.c(self.b(h) + h)  # b's output meets a's: neither can shrink alone

    torch.manual_seed(0)
    gm = sparsifx.sparsify(
        Skip(), {"stages": [{"pass": "set", "distribution": "uniform", "sparsity": 0.5, "dense_first_layer": False}]}
    )
    ctrl = sparsifx.attach(gm, torch.optim.SGD(gm.parameters(), lr=0.1))
    pairs, skipped = hidden_layers(ctrl)
    assert pairs == {}
    assert "2 users" in skipped["a"] and "takes other tensors" in skipped["b"]
    with caplog.at_level("INFO"):
        assert prune_neurons(ctrl, 20) == []
    assert "skips layer 'a'" in caplog.text
    assert gm.get_submodule("a").out_features == 16


def test_a_dense_uncontrolled_next_layer_loses_its_columns_too():
    gm, opt, data = setup("sparse", ignore=["5"])
    ctrl = sparsifx.attach(gm, opt)
    assert ctrl.names == ["0", "2"] and type(gm.get_submodule("5")) is nn.Linear
    train(gm, opt, data, 2)
    scores = {n: importance(gm.get_submodule(n)).numpy() for n in ("0", "2")}
    removed = {n: torch.from_numpy(s <= np.percentile(s, 20)) for n, s in scores.items()}
    reference = zeroed_reference(gm, removed).eval()
    momentum = opt.state[gm.get_submodule("5").weight]["momentum_buffer"].clone()
    prune_neurons(ctrl, 20)
    out = gm.get_submodule("5")
    assert out.in_features == int((~removed["2"]).sum()) == out.weight.shape[1]
    torch.testing.assert_close(opt.state[out.weight]["momentum_buffer"], momentum[:, ~removed["2"]])
    x = torch.randn(10, 8)
    torch.testing.assert_close(gm.eval()(x), reference(x))
    train(gm, opt, data, 2)
