"""Static sparse training: fixed masks from the distributions, on toys and a torchvision model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.masking import is_masked


def lenet(inputs: int = 784) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def test_erk_vector_on_lenet_300_100_and_exact_counts():
    gm = sparsifx.sparsify(lenet(), {"stages": [{"pass": "static", "sparsity": 0.9, "distribution": "erk"}]})
    ctrl = sparsifx.passes.training.controller(gm)
    assert ctrl.names == ["0", "2"]  # fc3 forced dense by ERK at 90%
    assert not is_masked(gm.get_submodule("4"))
    assert 1 - ctrl.density("0") == pytest.approx(0.9204, abs=1e-4)
    assert 1 - ctrl.density("2") == pytest.approx(0.7698, abs=1e-4)
    total = 300 * 784 + 100 * 300 + 10 * 100
    nnz = sum(ctrl.nnz().values()) + 10 * 100
    assert abs(nnz - 0.1 * total) <= 2


def test_mask_stays_fixed_and_masked_weights_stay_zero_under_adamw():
    gm = sparsifx.sparsify(
        lenet(64),
        {"stages": [{"pass": "static", "sparsity": 0.8, "distribution": "uniform", "dense_first_layer": False}]},
    )
    ctrl = sparsifx.passes.training.controller(gm)
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)
    ctrl.attach(opt, steps_per_epoch=2, epochs=3)
    masks = ctrl.masks()
    w0 = {n: m.weight.detach().clone() for n, m in ctrl.layers.items()}
    data = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(gm(data[0]), data[1]).backward()
        opt.step()
    for name, module in ctrl.layers.items():
        assert torch.equal(module.mask, masks[name])
        assert torch.all(module.weight[module.mask == 0] == 0)
        assert not torch.equal(module.weight, w0[name])
    assert ctrl.history == []
    assert ctrl.training_flops()["flops_ratio"] < 0.5


def test_static_on_resnet18_outputs_match_masked_reference():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10).eval()
    gm = sparsifx.sparsify(net, {"stages": [{"pass": "static", "sparsity": 0.8, "ignore": ["fc"]}]})
    gm.graph.lint()
    ctrl = sparsifx.passes.training.controller(gm)
    assert "fc" not in ctrl.names and "layer4.1.conv2" in ctrl.names
    assert "conv1" not in ctrl.names  # ERK made the stem dense (its density would exceed 1)
    ref = __import__("copy").deepcopy(net)
    with torch.no_grad():
        for name in ctrl.names:
            ref.get_submodule(name).weight.mul_(gm.get_submodule(name).mask)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm.eval()(x), ref(x))
    convs = [m for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)]
    dense = sum(m.weight.numel() for n, m in gm.named_modules() if isinstance(m, nn.Conv2d) and n not in ctrl.names)
    total = sum(m.weight.numel() for m in convs)
    assert (sum(ctrl.nnz().values()) + dense) / total == pytest.approx(0.2, abs=1e-3)  # ERK keeps the budget


def test_modified_is_exact_and_per_layer_override():
    from sparsifx.passes.training.static import Static

    gm = sparsifx.trace(lenet(64))
    assert Static.from_params({"sparsity": 0.5})(gm).modified
    empty = sparsifx.sparsify(lenet(64), {"stages": [{"pass": "static", "types": ["Conv2d"]}]})
    assert empty.meta["history"][0].modified is False
    assert "sparse_controller" not in empty.meta
    gm = sparsifx.sparsify(
        lenet(64),
        {
            "stages": [
                {
                    "pass": "static",
                    "sparsity": 0.5,
                    "distribution": "uniform",
                    "dense_first_layer": False,
                    "by_name": {"2": {"sparsity": 0.95}},
                }
            ]
        },
    )
    ctrl = sparsifx.passes.training.controller(gm)
    assert ctrl.density("0") == pytest.approx(0.5, abs=1e-3)
    assert ctrl.density("2") == pytest.approx(0.05, abs=1e-3)


def test_controller_state_dict_round_trip():
    gm = sparsifx.sparsify(lenet(64), {"stages": [{"pass": "static", "sparsity": 0.5}]})
    ctrl = sparsifx.passes.training.controller(gm)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    ctrl.attach(opt)
    opt.zero_grad()
    gm(torch.randn(4, 64)).sum().backward()
    opt.step()
    state = ctrl.state_dict()
    assert state["step"] == 1 and state["flops"]["steps"] == 1
    ctrl.load_state_dict({**state, "step": 7})
    assert ctrl.step == 7


def test_attach_needs_a_sparse_training_pass_and_an_optimizer():
    gm = sparsifx.trace(lenet(64))
    with pytest.raises(sparsifx.SparsifxError, match="no sparse controller"):
        sparsifx.attach(gm, torch.optim.SGD(gm.parameters(), lr=0.1))
    sparse = sparsifx.sparsify(lenet(64), {"stages": [{"pass": "static", "sparsity": 0.5}]})
    with pytest.raises(sparsifx.PreconditionError):
        sparsifx.attach(sparse, "not an optimizer")
    with pytest.raises(sparsifx.PreconditionError):
        sparsifx.attach(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), steps_per_epoch=0)
