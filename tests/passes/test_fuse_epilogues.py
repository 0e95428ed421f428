"""``fuse_epilogues`` and ``lower``'s whole-network path: fused residual/ReLU/ReLU6, padded hand-offs, exactness."""

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.backends import cpp_kernel
from sparsifx.backends.fast_pool import FastMaxPool2d
from sparsifx.backends.sparse_conv import DirectSparseConv2d
from sparsifx.testing import randomize_constants

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")
TOL = dict(rtol=1e-4, atol=1e-4)


class Block(nn.Module):
    """1x1 -> ReLU6 -> 3x3 (same) -> ReLU -> 1x1, plus a residual add and a final ReLU."""

    def __init__(self, c=16):
        super().__init__()
        self.a = nn.Conv2d(c, 2 * c, 1)
        self.b = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2)
        self.c = nn.Conv2d(2 * c, c, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        y = torch.relu(self.b(self.act(self.a(x))))
        return torch.relu(self.c(y) + x)


def _prune(model, x, sparsity=0.7):
    return sparsifx.sparsify(
        model, {"stages": [{"pass": "magnitude", "sparsity": sparsity}]}, example_inputs=(x,)
    ).eval()


# (height, width): output rows narrower than 48 are cut in 64-column tiles across rows, wider ones row by row;
# 7x7 and 14x14 are resnet's late maps, where the padded hand-off stores tiles that span several rows
@pytest.mark.parametrize("hw", [(9, 11), (7, 7), (14, 14), (3, 50)])
def test_fused_block_is_exact_and_fused(hw):
    torch.manual_seed(0)
    x = torch.randn(2, 16, *hw)
    masked = _prune(Block().eval(), x)
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower", "backend": "direct"}]}, example_inputs=(x,))
    a, b, c = (lowered.get_submodule(n) for n in "abc")
    assert all(isinstance(m, DirectSparseConv2d) for m in (a, b, c))
    assert (a.activation, b.activation, c.activation, c.residual) == ("relu6", "relu", "relu", True)
    assert a.out_pad == (1, 1) and b.in_padded  # a writes its output padded for the 3x3 that reads it
    ops = [n.op for n in lowered.graph.nodes]
    assert ops.count("call_function") == 0 and ops.count("call_module") == 3  # add and activations are gone
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), masked(x), **TOL)
        torch.testing.assert_close(lowered(torch.randn(1, 16, 5, 6)).shape, (1, 16, 5, 6))


def test_no_fusion_without_fuse_or_when_the_output_has_two_users():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return torch.relu(y) + y

    x = torch.randn(1, 8, 6, 6)
    masked = _prune(TwoUsers().eval(), x)
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower", "backend": "direct"}]}, example_inputs=(x,))
    assert lowered.a.activation is None and not lowered.a.residual
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), masked(x), **TOL)
    plain = sparsifx.sparsify(
        _prune(Block().eval(), torch.randn(1, 16, 6, 6)),
        {"stages": [{"pass": "lower", "backend": "direct", "fuse": False}]},
        example_inputs=(torch.randn(1, 16, 6, 6),),
    )
    assert plain.a.activation is None and not plain.b.in_padded


def test_lower_resnet18_measures_layers_and_stays_exact():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    randomize_constants(model)  # constants hide pruning errors
    x = torch.randn(1, 3, 64, 64)
    masked = sparsifx.sparsify(
        model,
        {
            "stages": [
                {"pass": "magnitude", "sparsity": 0.9, "distribution": "uniform", "dense_first_layer": True},
                {"pass": "fold_bn"},
            ]
        },
        example_inputs=(x,),
    ).eval()
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower", "measure": True}]}, example_inputs=(x,))
    summary = lowered.meta["lower_summary"]
    assert summary["layers"] == 21 and summary["flop_speedup"] > 1  # 20 sparse layers and the dense stem, timed too
    assert {"predicted_speedup", "measured_speedup", "model_dense_ms", "model_lowered_ms"} <= set(summary)
    extra = lowered.meta["report_extra"]["layer1.0.conv1"]
    assert {"dense_ms", "lowered_ms", "measured_speedup", "flop_speedup", "executed_macs"} <= set(extra)
    assert isinstance(lowered.maxpool, FastMaxPool2d)
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-3, atol=1e-3)
