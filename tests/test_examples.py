"""The custom-pass example runs as a script and its pass is numerically right."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx import Recipe, RecipeError, sparsify
from sparsifx.registry import PASSES

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_custom_pass_example_is_short_and_runs():
    source = EXAMPLES / "custom_pass.py"
    assert len(source.read_text().splitlines()) < 40
    proc = subprocess.run([sys.executable, str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "leaky_relu nodes: 17" in proc.stdout  # resnet18 calls its ReLU modules 17 times
    assert "history: [('leaky_relu', True), ('magnitude', True)]" in proc.stdout


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return torch.relu(self.fc2(self.act(self.fc1(x))))


def test_custom_pass_semantics_and_recipe_validation():
    namespace = runpy.run_path(str(EXAMPLES / "custom_pass.py"), run_name="custom_pass_example")
    assert PASSES.get("leaky_relu") is namespace["LeakyReLUPass"]
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(5, 4)
    gm = sparsify(model, {"stages": [{"pass": "leaky_relu", "negative_slope": 0.2}]}, (x,))
    assert sum(n.target is F.leaky_relu for n in gm.graph.nodes) == 2
    assert not any(n.target is torch.relu or n.target == "act" for n in gm.graph.nodes)
    gm.graph.lint()
    expected = F.leaky_relu(model.fc2(F.leaky_relu(model.fc1(x), 0.2)), 0.2)
    torch.testing.assert_close(gm(x), expected)
    again = namespace["LeakyReLUPass"](negative_slope=0.2)(gm)
    assert again.modified is False
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"stages": [{"pass": "leaky_relu", "negative_slope": 3}]})
    assert info.value.path == "stages[0].negative_slope"


def test_demo_writes_verified_onnx_and_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--input-size", "32", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    onnx_file = tmp_path / "resnet18_magnitude.onnx"
    assert onnx_file.is_file() and onnx_file.stat().st_size > 1_000_000
    out = proc.stdout
    assert "pass fold_bn      modified=True   verified" in out
    assert "onnxruntime vs torch, batch 1" in out
    assert "MaskedConv2d" in out and any(line.startswith("total") for line in out.splitlines())


def test_detector_example_prunes_backbone_and_still_detects(tmp_path):
    prune_detector = runpy.run_path(str(EXAMPLES / "prune_detector.py"))["prune_detector"]
    result = prune_detector(size=128, ratio=0.5, onnx_path=tmp_path / "backbone.onnx")
    assert result["ratio"] < 0.5  # really pruned (FPN outputs stay 256 channels)
    assert all(shape[1] == 256 for shape in result["feature_maps"].values())
    assert set(result["detections"]) == {"boxes", "labels", "scores"}
    assert (tmp_path / "backbone.onnx").is_file()
