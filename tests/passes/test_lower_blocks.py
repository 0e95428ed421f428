"""``lower``'s block step: inverted residual blocks found in the graph and fused where measured faster."""

import pytest
import torch
import torch.nn as nn
import torchvision
from lower_helpers import masked

import sparsifx
from sparsifx.backends import cost_model, cpp_kernel
from sparsifx.backends.sparse_block import SparseInvertedResidual
from sparsifx.passes.lower_blocks import find_blocks

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")
TOL = dict(rtol=1e-4, atol=1e-4)
LOWER = {"pass": "lower", "whole_model": False, "micro_batch": False}


def timer(block_ms: float, onnxruntime_ms: float = 1.0):
    """A ``median_ms`` that runs each candidate once: the fused block takes ``block_ms``, the whole model in
    onnxruntime ``onnxruntime_ms``, everything else 1 ms."""

    def median_ms(fns, reps=7, **_):
        for f in fns.values():
            f()
        return {k: {"block": block_ms, "onnxruntime": onnxruntime_ms}.get(k, 1.0) for k in fns}

    return median_ms


def _mobilenet():
    return masked(torchvision.models.mobilenet_v2(), torch.randn(2, 3, 64, 64))


@pytest.fixture(scope="module")
def mobilenet():
    return _mobilenet()


def test_finds_every_inverted_residual_block_of_mobilenet_v2(mobilenet):
    model, _ = mobilenet
    blocks = find_blocks(model)
    # features.2 .. features.17 have an expand layer (features.1 has none); 10 of them add their input
    assert [m.convs[0] for m in blocks] == [f"features.{i}.conv.0.0" for i in range(2, 18)]
    assert sum(m.residual for m in blocks) == 10
    assert all(m.activations == ("relu6", "relu6") for m in blocks)


@pytest.mark.parametrize("block_ms", [0.5, 5.0])
def test_fused_where_faster_and_outputs_match(mobilenet, monkeypatch, block_ms, tmp_path):
    model, x = mobilenet
    monkeypatch.setattr(cost_model, "median_ms", timer(block_ms))
    lowered = sparsifx.sparsify(model, {"stages": [LOWER]}, example_inputs=(x,)).eval()
    fused = [m for m in lowered.modules() if isinstance(m, SparseInvertedResidual)]
    assert len(fused) == (16 if block_ms < 3 else 0)
    rows = lowered.meta["report_extra"]
    decision = rows["features.3.conv.0.0"]["fused_block"]
    assert decision["kept"] == ("block" if block_ms < 3 else "layers")
    if fused:
        project = rows["features.3.conv.2"]
        assert project["backend"] == "block" and project["block"] == decision["name"]
        block_rows = [r["lowered_ms"] for n, r in rows.items() if n.startswith("features.3.")]
        assert sum(block_rows) == pytest.approx(0.5, abs=1e-3)  # the block's time, shared among its layers
    lowered.graph.lint()
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), model(x), **TOL)
        torch.testing.assert_close(lowered(x[:1]), model(x[:1]), **TOL)
    sparsifx.save(lowered, tmp_path / "m.sfx")
    with torch.inference_mode():
        torch.testing.assert_close(sparsifx.load(tmp_path / "m.sfx")(x), model(x), **TOL)


def test_switched_off_and_forced_backends_are_left_alone(mobilenet, monkeypatch):
    model, x = mobilenet
    monkeypatch.setattr(cost_model, "median_ms", timer(0.5))
    for stage in ({**LOWER, "fuse_blocks": False}, {**LOWER, "fuse": False}, {**LOWER, "backend": "dense"}):
        lowered = sparsifx.sparsify(model, {"stages": [stage]}, example_inputs=(x,))
        assert not any(isinstance(m, SparseInvertedResidual) for m in lowered.modules()), stage


class Shared(nn.Module):
    """An expand whose output has a second user, and a block whose project output is the model's output."""

    def __init__(self):
        super().__init__()
        self.e, self.d = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.p = nn.Conv2d(16, 4, 1)
        self.e2, self.d2 = nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.p2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.e(x))
        y = self.p(torch.relu(self.d(h))) + h.mean(1, keepdim=True)  # h has two users: not a block
        return self.p2(self.d2(self.e2(y)))  # no activations, no residual: a block


def test_only_single_user_chains_are_blocks_and_the_output_block_matches(monkeypatch):
    model, x = masked(Shared(), torch.randn(1, 4, 9, 9))
    assert [m.convs for m in find_blocks(model)] == [("e2", "d2", "p2")]
    monkeypatch.setattr(cost_model, "median_ms", timer(0.5))
    lowered = sparsifx.sparsify(model, {"stages": [LOWER]}, example_inputs=(x,)).eval()
    assert sum(isinstance(m, SparseInvertedResidual) for m in lowered.modules()) == 1
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), model(x), **TOL)


def test_blocks_of_an_onnx_file_are_fused(monkeypatch, tmp_path):
    """``load_onnx`` lowers too: Clip(0, 6) imports as ReLU6, so a block exported to ONNX is found again."""
    from sparsifx.backends.onnx_import import load_onnx
    from sparsifx.backends.ort_runtime import export_dense_onnx

    block = torchvision.models.mobilenetv2.InvertedResidual(8, 8, 1, 4)
    model, x = masked(nn.Sequential(block, nn.ReLU()), torch.randn(1, 8, 10, 10))
    export_dense_onnx(model, (x,), tmp_path / "m.onnx")
    monkeypatch.setattr(cost_model, "median_ms", timer(0.5, onnxruntime_ms=10.0))  # the lowered model kept
    lowered = load_onnx(tmp_path / "m.onnx")
    assert sum(isinstance(m, SparseInvertedResidual) for m in lowered.modules()) == 1
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), model(x), **TOL)
