"""HeavyOpsOnMeta records exactly the tensor_meta that a real ShapeProp run records."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from torch.fx.passes.shape_prop import ShapeProp

import sparsifx
from sparsifx.shape_prop import HeavyOpsOnMeta
from sparsifx.tracing import record_shapes


def _metas(gm: fx.GraphModule) -> dict[str, object]:
    return {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}


def _both(model: nn.Module, *inputs) -> tuple[dict, dict]:
    gm = sparsifx.trace(model.eval())
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
        real = _metas(gm)
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
        HeavyOpsOnMeta(gm).propagate(*inputs)
    return real, _metas(gm)


@pytest.mark.parametrize(
    "name,side",
    [
        ("resnet18", 64),
        ("mobilenet_v3_small", 64),
        ("googlenet", 64),
        ("regnet_y_400mf", 64),
        ("vit_b_32", 64),
        ("swin_t", 64),
        ("convnext_tiny", 64),
    ],
)
def test_torchvision_metas_equal_real_run(name, side):
    kwargs = {"image_size": side} if name.startswith("vit") else {}
    kwargs.update({"aux_logits": False, "init_weights": False} if name == "googlenet" else {})
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    real, fast = _both(model, torch.randn(1, 3, side, side))
    assert fast == real


class Mixed(nn.Module):
    """Padding modes and strings, dilation, 1d/3d convs, a 3-d Linear input, functional matmuls."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 8, (3, 5), padding="same")
        self.c3 = nn.Conv3d(4, 4, 2, padding="valid", groups=2)
        self.lin = nn.Linear(6, 5)
        self.proj = nn.Parameter(torch.ones(8 * 9 * 11, 3))

    def forward(self, x1, x2, x3):
        a = self.lin(self.c1(x1).transpose(1, 2))
        b = self.c2(x2)
        c = self.c3(x3)
        return torch.matmul(a, a.transpose(1, 2)), b.flatten(1) @ self.proj, c.sum()


def test_mixed_convs_linear_and_matmuls():
    real, fast = _both(Mixed(), torch.randn(2, 4, 17), torch.randn(2, 4, 9, 11), torch.randn(1, 4, 5, 6, 7))
    assert fast == real


def test_channels_last_input_keeps_channels_last_strides():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(2, 8, 10, 10).to(memory_format=torch.channels_last)
    real, fast = _both(model, x)
    assert fast == real
    assert real["_0"].memory_format == torch.channels_last


def test_heavy_ops_compute_nothing():
    """The fast run really skips the arithmetic: a conv whose real forward raises is never run."""

    class Exploding(nn.Conv2d):
        def forward(self, x):
            raise AssertionError("real conv forward was called")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    gm = sparsifx.trace(model)
    gm._modules["0"].forward = Exploding.forward.__get__(gm._modules["0"])
    record_shapes(gm, (torch.randn(1, 3, 8, 8),))
    assert gm.graph.find_nodes(op="call_module", target="1")[0].meta["tensor_meta"].shape == (1, 4, 6, 6)


def test_falls_back_to_a_real_run_when_the_fast_run_raises(capfd):
    """An op that rejects the zeros a skipped conv passes on: the real run records the shapes, and the
    handled failure prints no traceback."""

    class NeedsNonZero(nn.Module):
        def forward(self, x):
            if not bool(x.abs().sum() > 0):
                raise ValueError("all zeros")
            return x * 2

    @sparsifx.tracing.register_leaf_type
    class Leaf(NeedsNonZero):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Leaf())
    gm = sparsifx.trace(model)
    record_shapes(gm, (torch.randn(1, 3, 8, 8),))
    assert gm.graph.find_nodes(op="call_module", target="1")[0].meta["tensor_meta"].shape == (1, 4, 6, 6)
    assert "Traceback" not in capfd.readouterr().err
