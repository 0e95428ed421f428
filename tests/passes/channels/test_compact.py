"""compact: channels whose producing weights are all zero are removed exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.errors import RecipeError
from sparsifx.masking import set_mask
from sparsifx.pass_manager import run_model
from sparsifx.registry import PASSES


def _compact(gm, **params):
    return PASSES.get("compact").from_params(params)(gm)


def _resnet(size=32):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    return sparsifx.trace(model, (x,)), x


def test_dead_rows_before_relu_are_removed_exactly():
    gm, x = _resnet()
    dead = torch.tensor([0, 3, 5, 9, 10, 40])
    with torch.no_grad():
        gm.get_submodule("layer1.0.conv1").weight[dead] = 0
        bn = gm.get_submodule("layer1.0.bn1")
        bn.bias[dead] = -1.0  # relu(constant < 0) = 0: the channel is exactly zero downstream
    ref = run_model(gm, (x,))
    res = _compact(gm)
    assert res.modified and res.gm is gm
    res.gm.graph.lint()
    assert gm.get_submodule("layer1.0.conv1").out_channels == 64 - len(dead)
    assert gm.get_submodule("layer1.0.bn1").num_features == 64 - len(dead)
    assert gm.get_submodule("layer1.0.conv2").in_channels == 64 - len(dead)
    assert gm.get_submodule("layer1.0.conv2").weight.shape == (64, 64 - len(dead), 3, 3)
    torch.testing.assert_close(run_model(gm, (x,)), ref, rtol=1e-5, atol=1e-5)
    assert gm.meta["channel_report"]["removed_units"] == len(dead)


def test_positive_constant_into_padded_conv_is_kept_and_reported():
    gm, x = _resnet()
    with torch.no_grad():
        gm.get_submodule("layer1.0.conv1").weight[[1, 2]] = 0
        bn = gm.get_submodule("layer1.0.bn1")
        bn.bias[1] = 0.7  # relu(0.7) = 0.7 feeds a padded 3x3 conv: folding is not exact -> kept
        bn.bias[2] = -0.5  # relu(-0.5) = 0 -> removed
    ref = run_model(gm, (x,))
    assert _compact(gm).modified
    assert gm.get_submodule("layer1.0.conv1").out_channels == 63
    torch.testing.assert_close(run_model(gm, (x,)), ref, rtol=1e-5, atol=1e-5)
    assert any("kept a channel unit" in n for n in gm.meta["channel_report"]["kept_for_exactness"])


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_constant_channel_folded_into_linear_bias():
    torch.manual_seed(0)
    model = _Head().eval()
    with torch.no_grad():
        model.conv.weight[[2, 5]] = 0
        model.bn.bias[[2, 5]] = torch.tensor([0.8, 1.3])  # constant positive activations -> folded
        model.bn.running_mean.normal_()
    x = torch.randn(3, 3, 8, 8)
    gm = sparsifx.trace(model, (x,))
    ref = run_model(gm, (x,))
    bias_before = gm.fc.bias.detach().clone()
    assert _compact(gm).modified
    assert gm.conv.out_channels == 6 and gm.fc.in_features == 6
    assert not torch.equal(gm.fc.bias, bias_before)
    assert gm.meta["channel_report"]["folded"] == 2
    torch.testing.assert_close(run_model(gm, (x,)), ref, rtol=1e-5, atol=1e-5)


def test_masked_rows_after_unstructured_sparsity_are_removed():
    gm, x = _resnet()
    conv = gm.get_submodule("layer2.0.conv1")
    mask = (torch.rand_like(conv.weight) > 0.5).float()
    mask[:32] = 0  # half the rows fully masked (weights themselves stay non-zero)
    set_mask(gm, "layer2.0.conv1", mask)
    with torch.no_grad():
        gm.get_submodule("layer2.0.bn1").bias[:32] = -2.0
    ref = run_model(gm, (x,))
    assert _compact(gm).modified
    conv = gm.get_submodule("layer2.0.conv1")
    assert type(conv).__name__ == "MaskedConv2d" and conv.out_channels == 96
    assert conv.mask.shape == conv.weight.shape == (96, 64, 3, 3)
    torch.testing.assert_close(run_model(gm, (x,)), ref, rtol=1e-5, atol=1e-5)


def test_nothing_dead_is_not_modified():
    gm, x = _resnet()
    code = gm.code
    ref = run_model(gm, (x,))
    res = _compact(gm)
    assert not res.modified and gm.code == code
    torch.testing.assert_close(run_model(gm, (x,)), ref, rtol=0, atol=0)


def test_mobilenet_v3_random_dead_rows_exact():
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = sparsifx.trace(model, (x,))
    convs = [(n, m) for n, m in gm.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    with torch.no_grad():
        for _, m in convs:
            rows = torch.randperm(m.out_channels)[: m.out_channels // 4]
            m.weight[rows] = 0
            if m.bias is not None:
                m.bias[rows] = 0
    for bn in (m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.bias.data.zero_(), bn.running_mean.data.zero_()  # dead rows stay exactly zero through BN
    ref = run_model(gm, (x,))
    params_before = sum(p.numel() for p in gm.parameters())
    res = _compact(gm)
    assert res.modified
    res.gm.graph.lint()
    assert sum(p.numel() for p in gm.parameters()) < params_before
    assert gm.meta["channel_report"]["removed_units"] > 0
    torch.testing.assert_close(run_model(gm, (x,)), ref, rtol=1e-4, atol=1e-5)


def test_compact_in_a_recipe_and_bad_params():
    gm, x = _resnet()
    with torch.no_grad():
        gm.get_submodule("layer3.0.conv1").weight[:8] = 0
        gm.get_submodule("layer3.0.bn1").bias[:8] = -1
    result = sparsifx.PassManager.from_recipe(
        sparsifx.Recipe.from_dict({"stages": [{"pass": "compact"}]}), example_inputs=(x,), verify=True
    ).run(gm)
    assert result.modified and gm.get_submodule("layer3.0.conv1").out_channels == 248
    with pytest.raises(RecipeError, match="atol"):
        PASSES.get("compact").from_params({"atol": -1.0})


def test_dead_conv_group_of_resnext_is_removed_with_its_group():
    """A grouped conv (in == out) whose one whole conv group is dead loses that group: groups 32 -> 31."""
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = sparsifx.trace(model, (x,))
    with torch.no_grad():
        gm.get_submodule("layer1.0.conv1").weight[8:12] = 0  # feeds conv group 2 of conv2 (width 4)
        gm.get_submodule("layer1.0.bn1").bias[8:12] = -1.0  # relu(negative constant) = 0
        gm.get_submodule("layer1.0.conv2").weight[8:12] = 0
        gm.get_submodule("layer1.0.bn2").bias[8:12] = -1.0
    ref = run_model(gm, (x,))
    assert _compact(gm).modified
    gm.graph.lint()
    conv2 = gm.get_submodule("layer1.0.conv2")
    assert conv2.groups == 31 and conv2.in_channels == conv2.out_channels == 124
    assert conv2.weight.shape == (124, 4, 3, 3)
    torch.testing.assert_close(run_model(gm, (x,)), ref, rtol=1e-5, atol=1e-5)
