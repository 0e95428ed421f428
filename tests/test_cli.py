"""The ``sparsifx`` console script: run, inspect, and one-line errors for bad arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from sparsifx.cli import main

RECIPE = """\
name: cli_test
stages:
  - pass: magnitude
    sparsity: 0.7
  - pass: fold_bn
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def onnx_file(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_out") / "r18.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsifx.cli",
            "run",
            str(recipe),
            "--model",
            "torchvision:resnet18",
            "--input-shape",
            "1,3,32,32",
            "--onnx",
            str(out),
            "--verify",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, proc


def test_run_prints_report_and_writes_verified_onnx(onnx_file):
    out, proc = onnx_file
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sparsifx report:") and "[1, 3, 32, 32]" in lines[0]
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[3] == "70.0%"  # global sparsity of the recipe, over all parameters incl. BN folded away
    assert "MaskedConv2d" in proc.stdout and "bn1" not in proc.stdout.split()  # BN folded into convs
    assert out.is_file() and f"wrote {out}" in proc.stdout and "onnxruntime matches torch" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_inspect_onnx(onnx_file, capsys):
    out, _ = onnx_file
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MB on disk" in text.splitlines()[0]
    total = next(line for line in text.splitlines() if line.startswith("total")).split()
    assert total[-1] == "70.0%"
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["params"] == sum(r["params"] for r in data["initializers"])
    assert data["file_bytes"] == out.stat().st_size


def test_inspect_pickled_module_needs_flag(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    path = tmp_path / "model.pt"
    torch.save(model, path)
    assert main(["inspect", str(path)]) != 0
    err = capsys.readouterr().err
    assert "--unsafe-pickle" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(path), "--unsafe-pickle", "--input-shape", "3,8"]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "46" in text  # 46 parameters
    row = next(line for line in text.splitlines() if line.startswith("0 ")).split()
    assert row[2:5] == ["36", "20", "44.4%"]  # 16 of 36 weights zeroed


def test_inspect_saved_module(tmp_path, capsys):
    serialization = pytest.importorskip("sparsifx.serialization")
    import sparsifx

    gm = sparsifx.trace(nn.Sequential(nn.Linear(8, 4), nn.ReLU()))
    path = tmp_path / "saved.sfx"
    serialization.save(gm, path)
    assert main(["inspect", str(path), "--input-shape", "2,8"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "sparsifx report: Sequential on input [[2, 8]]"
    row = next(line for line in text.splitlines() if line.startswith("0 ")).split()
    assert row[1:3] == ["Linear", "36"] and row[5] == "64"  # 2 x 8 x 4 MACs


BAD_ARGS = [
    (["run"], "required"),
    (["run", "missing.yaml", "--model", "torchvision:resnet18"], "recipe file not found"),
    (["run", "{recipe}", "--model", "resnet18"], "--model must be"),
    (["run", "{recipe}", "--model", "torchvision:not_a_model"], "unknown torchvision model"),
    (["run", "{recipe}", "--model", "torchvision:resnet18", "--input-shape", "1,x"], "--input-shape"),
    (["inspect", "nope.onnx"], "no such file"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize("argv,expected", BAD_ARGS)
def test_bad_arguments_one_line_nonzero(argv, expected, recipe, capsys):
    argv = [a.format(recipe=recipe) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("sparsifx: error:")
    assert expected in err and "Traceback" not in err


def test_bad_recipe_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - pass: magnitude\n    sparsity: 1.5\n")
    assert main(["run", str(bad), "--model", "torchvision:resnet18"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "stages[0].sparsity" in err


def test_console_script_error_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("sparsifx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sparsifx.cli"]
    proc = subprocess.run(
        cmd + ["inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"sparsifx: error: no such file: {tmp_path / 'missing.onnx'}"]
