"""The examples create the folder they write ONNX into (``export_onnx`` writes only into existing folders)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"{name}_example")


def test_demo_export_creates_its_output_folder(tmp_path, capsys):
    demo = load_example("demo")
    path = tmp_path / "new" / "out" / "tiny.onnx"
    torch.manual_seed(0)
    written = demo["export_verified"](nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), path, torch.randn(1, 4))
    assert Path(written) == path and path.is_file()
    assert "onnxruntime vs torch" in capsys.readouterr().out


def test_train_sparse_creates_its_output_folder(tmp_path):
    pytest.importorskip("sklearn")
    out = load_example("train_sparse")["main"](
        [
            "--method",
            "static",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--out",
            str(tmp_path / "new" / "l.onnx"),
        ]
    )
    assert (tmp_path / "new" / "l.onnx").is_file() and Path(out["path"]) == tmp_path / "new" / "l.onnx"
