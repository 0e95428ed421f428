"""``sparsifx bench``: latency beside onnxruntime dense, on an ONNX file or a pruned model source."""

import json

import pytest
import torch
import torch.nn as nn

from sparsifx.backends import cpp_kernel
from sparsifx.cli import main

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")


def test_bench_onnx_file_prints_rows_as_json(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(torch.rand_like(model[2].weight) > 0.9)
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 16, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    assert main(["bench", str(path), "--batch", "1,2", "--reps", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["max_abs_diff"] < 1e-3 and r["speedup"] > 0 for r in rows)
    assert all(r["runs_on"] == "onnxruntime" or r["runs_on"].startswith("sparse kernels") for r in rows)


def test_bench_model_source_needs_sparsity(capsys):
    assert main(["bench", "torchvision:resnet18"]) != 0
    assert "--sparsity" in capsys.readouterr().err
