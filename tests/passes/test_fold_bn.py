"""fold_bn: Conv/Linear + BatchNorm folding (graph change, exactness, guards, real models)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from sparsifx import PassManager, sparsify
from sparsifx.masking import MaskedConv2d, is_masked
from sparsifx.passes.fold_bn import FoldBatchNorm
from sparsifx.passes.magnitude import MagnitudePruning
from sparsifx.tracing import trace


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics, so a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    ]


def eval_out(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(x)


class ConvBN(nn.Module):
    def __init__(self, dims: int = 2, bias: bool = False):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv, self.bn, self.conv2, self.bn2 = conv(3, 8, 3, bias=bias), bn(8), conv(8, 4, 1, bias=True), bn(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("dims,bias", [(1, False), (2, False), (2, True), (3, True)])
def test_conv_bn_folded_exactly(dims, bias):
    torch.manual_seed(dims)
    model = randomize_bn(ConvBN(dims, bias))
    x = torch.randn(2, 3, *([6] * dims))
    gm = trace(model, (x,))
    result = FoldBatchNorm()(gm)
    assert result.modified and result.gm is gm
    gm.graph.lint()
    assert bn_nodes(gm) == []
    assert not hasattr(gm, "bn") and not hasattr(gm, "bn2")
    assert gm.conv.bias is not None and gm.conv.bias.shape == (8,)
    assert gm.conv.weight.shape == model.conv.weight.shape
    y = eval_out(gm, x)
    assert y.shape == eval_out(model, x).shape
    torch.testing.assert_close(y, eval_out(model, x), rtol=1e-5, atol=1e-5)
    again = FoldBatchNorm()(gm)
    assert again.modified is False


def test_folded_copy_leaves_shared_modules_untouched():
    model = randomize_bn(ConvBN())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fx.symbolic_trace(model)  # plain fx: gm shares submodules with model
    assert FoldBatchNorm()(gm).modified
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert gm.conv is not model.conv


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_bn1d_folds_with_2d_shape():
    model = randomize_bn(LinearBN())
    x = torch.randn(4, 5)
    gm = trace(model, (x,))
    assert FoldBatchNorm()(gm).modified
    assert bn_nodes(gm) == []
    torch.testing.assert_close(eval_out(gm, x), eval_out(model, x), rtol=1e-5, atol=1e-5)


def test_linear_bn1d_without_shapes_is_left_alone():
    gm = trace(randomize_bn(LinearBN()))  # no example inputs -> no recorded shapes
    result = FoldBatchNorm()(gm)
    assert result.modified is False and len(bn_nodes(gm)) == 1


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class NoStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("cls", [TwoUsers, SharedConv, NoStats])
def test_unfoldable_patterns_untouched(cls):
    model = randomize_bn(cls())
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,))
    code = gm.code
    result = FoldBatchNorm()(gm)
    assert result.modified is False and gm.code == code
    torch.testing.assert_close(eval_out(gm, x), eval_out(model, x))


def test_masked_conv_stays_masked_and_mask_valid():
    torch.manual_seed(0)
    model = randomize_bn(ConvBN())
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,))
    assert MagnitudePruning(sparsity=0.5)(gm).modified
    mask = gm.conv.mask.clone()
    reference = eval_out(gm, x)
    assert FoldBatchNorm()(gm).modified
    assert isinstance(gm.conv, MaskedConv2d) and is_masked(gm.conv2)
    assert torch.equal(gm.conv.mask, mask)
    assert torch.equal(gm.conv.effective_weight() == 0, mask == 0)
    torch.testing.assert_close(eval_out(gm, x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenet_v2", 32)])
def test_torchvision_all_bn_folded_and_verified(name, size):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(weights=None))
    x = torch.randn(2, 3, size, size)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    gm = trace(model, (x,))
    assert len(bn_nodes(gm)) == n_bn > 0
    result = PassManager([FoldBatchNorm()], example_inputs=(x,), verify=True).run(gm)
    assert result.modified and result.history[0].verified
    result.gm.graph.lint()
    assert bn_nodes(result.gm) == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.gm.modules())
    torch.testing.assert_close(eval_out(result.gm, x), eval_out(model, x), rtol=1e-4, atol=1e-4)


def test_training_mode_semantics_differ_deployment_only():
    model = randomize_bn(ConvBN())
    x = torch.randn(4, 3, 8, 8)
    gm = sparsify(model, {"stages": [{"pass": "fold_bn"}]}, example_inputs=(x,), verify=True)
    gm.train(), model.train()
    with torch.no_grad():
        assert not torch.allclose(gm(x), model(x), atol=1e-3)


class SharedBN(nn.Module):
    """One BatchNorm module applied after two different convs: both call sites fold."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x))


def test_shared_batchnorm_folds_into_each_producer():
    model = randomize_bn(SharedBN())
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,))
    assert FoldBatchNorm()(gm).modified
    assert bn_nodes(gm) == [] and not hasattr(gm, "bn")
    torch.testing.assert_close(eval_out(gm, x), eval_out(model, x), rtol=1e-5, atol=1e-5)
