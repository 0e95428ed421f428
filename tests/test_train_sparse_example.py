"""examples/train_sparse.py runs end to end (sklearn digits, one short run) and writes a verified ONNX file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sparse.py"


def test_train_sparse_example_runs_and_exports(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("train_sparse_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = EXAMPLE.read_text()
    assert text.count("# added line") == 2  # the whole integration is two lines
    out = module.main(
        [
            "--method",
            "set",
            "--data",
            "digits",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--sparsity",
            "0.8",
            "--out",
            str(tmp_path / "lenet.onnx"),
        ]
    )
    assert Path(out["path"]).is_file()
    assert out["accuracy"] > 0.5  # 2 epochs on digits: far above chance (0.1)
    assert out["updates"] == 1 and out["flops_ratio"] < 0.5
