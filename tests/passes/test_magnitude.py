"""magnitude: exact per-layer zero counts, distributions, selection overrides, exact `modified`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from sparsifx import RecipeError, sparsify
from sparsifx.distributions import layer_sparsities
from sparsifx.masking import MaskedConv2d, MaskedLinear, is_masked, masked_layers
from sparsifx.passes.magnitude import MagnitudePruning, magnitude_mask
from sparsifx.recipe import Stage
from sparsifx.tracing import trace


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.flatten(F.relu(self.conv(x)), 1)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def zeros(module: nn.Module) -> int:
    return int((module.mask == 0).sum()) if is_masked(module) else 0


def prunable(gm):
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.fixture
def net_gm():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    return trace(Net(), (x,)), x


def test_uniform_exact_counts_smallest_magnitudes_and_outputs(net_gm):
    gm, x = net_gm
    dense = {n: m.weight.detach().clone() for n, m in prunable(gm)}
    result = MagnitudePruning(sparsity=0.6)(gm)
    assert result.modified and result.gm is gm
    gm.graph.lint()
    assert isinstance(gm.conv, MaskedConv2d) and isinstance(gm.fc1, MaskedLinear)
    for name, m in prunable(gm):
        assert zeros(m) == round(0.6 * m.weight.numel()), name
        assert torch.equal(m.weight, dense[name])  # the mask is a buffer; weights untouched
        pruned, kept = dense[name].abs()[m.mask == 0], dense[name].abs()[m.mask == 1]
        assert pruned.max() <= kept.min()
    ref = Net()
    ref.load_state_dict({k: v for k, v in gm.state_dict().items() if not k.endswith("mask")})
    for name, m in prunable(gm):
        ref.get_submodule(name).weight.data.mul_(m.mask)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x))
        assert gm(x).shape == (2, 10)


def test_modified_is_exact(net_gm):
    gm, _ = net_gm
    assert MagnitudePruning(sparsity=0.0)(gm).modified is False
    assert not any(is_masked(m) for m in gm.modules())
    assert MagnitudePruning(sparsity=0.5)(gm).modified is True
    masks = {n: m.mask.clone() for n, m in masked_layers(gm)}
    assert MagnitudePruning(sparsity=0.5)(gm).modified is False  # same target, same masks
    assert all(torch.equal(m.mask, masks[n]) for n, m in masked_layers(gm))
    assert MagnitudePruning(sparsity=0.8)(gm).modified is True
    for name, m in masked_layers(gm):  # pruned weights score 0 and stay pruned
        assert bool((m.mask[masks[name] == 0] == 0).all()), name
        assert zeros(m) == round(0.8 * m.weight.numel())


def test_ties_broken_by_flat_index():
    w = torch.tensor([[3.0, 1.0, 1.0], [1.0, -2.0, 1.0]])
    assert magnitude_mask(w, 2).flatten().tolist() == [1, 0, 0, 1, 1, 1]
    assert magnitude_mask(w, 4).flatten().tolist() == [1, 0, 0, 0, 1, 0]
    assert magnitude_mask(torch.ones(7), 3).tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert magnitude_mask(w, 0).sum() == 6 and magnitude_mask(w, 6).sum() == 0


@pytest.mark.parametrize("kind", ["er", "erk"])
def test_distribution_counts_match_layer_sparsities(net_gm, kind):
    gm, _ = net_gm
    shapes = {n: tuple(m.weight.shape) for n, m in prunable(gm)}
    expected = layer_sparsities(shapes, 0.7, kind)
    assert MagnitudePruning(sparsity=0.7, distribution=kind)(gm).modified
    total = sum(math.prod(s) for s in shapes.values())
    pruned = 0
    for name, s in expected.items():
        m = gm.get_submodule(name)
        z = zeros(m)
        assert z == round(s * m.weight.numel()), name
        pruned += z
    assert abs(pruned - 0.7 * total) <= len(shapes)


def test_selection_priority_and_ignore(net_gm):
    gm, _ = net_gm
    stage = Stage.from_dict(
        {
            "pass": "magnitude",
            "sparsity": 0.1,
            "by_type": {"Linear": {"sparsity": 0.2}},
            "by_pattern": {"fc*": {"sparsity": 0.3}, "fc2*": {"sparsity": 0.35}},
            "by_name": {"fc2": {"sparsity": 0.4}},
            "ignore": ["head*"],
        }
    )
    assert stage.build()(gm).modified
    want = {"conv": 0.1, "fc1": 0.3, "fc2": 0.4}
    for name, s in want.items():
        assert zeros(gm.get_submodule(name)) == round(s * gm.get_submodule(name).weight.numel()), name
    assert not is_masked(gm.head)


def test_override_wins_over_erk_and_types_filter(net_gm):
    gm, _ = net_gm
    p = MagnitudePruning(
        sparsity=0.5,
        distribution="erk",
        selection=Stage.from_dict({"pass": "magnitude", "types": ["Linear"], "by_name": {"head": {"sparsity": 0.0}}})
        .build()
        .selection,
    )
    assert p.call(gm).modified
    assert not is_masked(gm.conv) and not is_masked(gm.head)
    shapes = {n: tuple(gm.get_submodule(n).weight.shape) for n in ("fc1", "fc2")}
    expected = layer_sparsities(shapes, 0.5, "erk")
    assert 0 in expected.values()  # fc2 is forced dense by ERK here
    for name, s in expected.items():
        assert zeros(gm.get_submodule(name)) == round(s * gm.get_submodule(name).weight.numel())


def test_dense_first_and_last_layer(net_gm):
    gm, _ = net_gm
    assert MagnitudePruning(sparsity=0.5, dense_first_layer=True, dense_last_layer=True)(gm).modified
    assert not is_masked(gm.conv) and not is_masked(gm.head)
    assert zeros(gm.fc1) == round(0.5 * gm.fc1.weight.numel())


@pytest.mark.parametrize(
    "params,path",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": "0.5"}, "sparsity"),
        ({"distribution": "gauss"}, "distribution"),
        ({"erk_power_scale": -1}, "erk_power_scale"),
        ({"dense_first_layer": 1}, "dense_first_layer"),
    ],
)
def test_bad_params(params, path):
    with pytest.raises(RecipeError) as info:
        MagnitudePruning.from_params(params)
    assert info.value.path == path


def test_resnet18_erk_recipe_global_sparsity():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = sparsify(model, {"stages": [{"pass": "magnitude", "sparsity": 0.8, "distribution": "erk"}]}, (x,))
    layers = prunable(gm)
    total = sum(m.weight.numel() for _, m in layers)
    pruned = sum(zeros(m) for _, m in layers)
    assert abs(pruned - 0.8 * total) <= len(layers)
    assert sum(is_masked(m) for _, m in layers) < len(layers)  # ERK keeps the highest-score layers dense
    gm.graph.lint()
    with torch.no_grad():
        assert gm(x).shape == (1, 1000) and torch.isfinite(gm(x)).all()


def test_mobilenet_v2_depthwise_uniform():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = sparsify(model, {"stages": [{"pass": "magnitude", "sparsity": 0.5}]}, (x,))
    for name, m in prunable(gm):
        assert zeros(m) == round(0.5 * m.weight.numel()), name
    with torch.no_grad():
        assert gm(x).shape == (1, 1000)


def test_uniform_recipe_file_on_resnet18():
    from pathlib import Path

    recipe = Path(__file__).parents[2] / "examples" / "recipes" / "uniform_magnitude.yaml"
    gm = sparsify(torchvision.models.resnet18(weights=None), recipe)
    want = {"conv1": None, "fc": 0.3, "layer1.0.conv1": 0.5, "layer4.1.conv2": 0.7, "layer4.0.downsample.0": 0.5}
    for name, s in want.items():
        m = gm.get_submodule(name)
        assert (s is None and not is_masked(m)) or zeros(m) == round(s * m.weight.numel()), name
