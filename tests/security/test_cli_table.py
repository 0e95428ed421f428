"""Every bad ``sparsifx`` invocation: a non-zero exit and exactly one line on stderr, never a traceback."""

from __future__ import annotations

import onnx
import pytest
import torch
from crafted_files import crafted_file
from onnx import TensorProto, helper

import sparsifx
from sparsifx.cli import main
from sparsifx.serialization import save

RECIPE = "stages:\n  - pass: magnitude\n    sparsity: 0.7\n"
BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "stages: *i\n"
)


def _files(d):
    files = {
        "recipe": RECIPE,
        "bomb": BOMB,
        "list_recipe": "- pass: magnitude\n",
        "bad_sparsity": "stages:\n  - pass: magnitude\n    sparsity: 1.5\n",
        "unknown_pass": "stages:\n  - pass: nope\n",
        "huge_number": "stages:\n  - pass: magnitude\n    sparsity: " + "9" * 5000 + "\n",
        "typo_name": "stages:\n  - pass: magnitude\n    sparsity: 0.5\n    by_name: {nothere: {}}\n",
    }
    for name, text in files.items():
        (d / f"{name}.yaml").write_text(text)
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 50)
    (d / "garbage.sfx").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (d / "empty.sfx").write_bytes(b"")
    (d / "adir").mkdir()
    init = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "16")):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [init],
    )
    onnx.save(helper.make_model(graph), str(d / "traversal.onnx"))
    crafted_file("placeholder_target", d / "evil.sfx", str(d / "canary"))
    save(sparsifx.trace(torch.nn.Sequential(torch.nn.Linear(8, 4))), d / "good.sfx")
    torch.save(torch.nn.Linear(2, 2), d / "pickled.pt")
    torch.save({"a": 1}, d / "pickled_dict.pt")


TINY = ["--model", "python:cli_models:tiny", "--input-shape", "1,3,8,8"]
BAD = [
    [],
    ["frobnicate"],
    ["run"],
    ["run", "{d}/recipe.yaml"],
    ["run", "{d}/recipe.yaml", "--model"],
    ["run", "{d}/missing.yaml", *TINY],
    ["run", "{d}/adir", *TINY],
    ["run", "{d}/recipe.yaml", "--model", "tiny"],
    ["run", "{d}/recipe.yaml", "--model", "torchvision:not_a_model"],
    ["run", "{d}/recipe.yaml", "--model", "python:no_such_module:f"],
    ["run", "{d}/recipe.yaml", "--model", "python:cli_models:raises"],
    ["run", "{d}/recipe.yaml", "--model", "python:cli_models:not_a_module"],
    ["run", "{d}/recipe.yaml", "--model", "python:cli_models:tiny", "--input-shape", "1,x"],
    ["run", "{d}/recipe.yaml", "--model", "python:cli_models:tiny", "--input-shape", "0,3"],
    ["run", "{d}/recipe.yaml", "--model", "python:cli_models:tiny", "--input-shape", ""],
    ["run", "{d}/recipe.yaml", "--model", "python:cli_models:tiny", "--input-shape", "1,5,8,8"],
    ["run", "{d}/recipe.yaml", *TINY, "--bogus"],
    ["run", "{d}/recipe.yaml", *TINY, "--onnx", "{d}/missing_dir/m.onnx"],
    ["run", "{d}/recipe.yaml", *TINY, "--save", "{d}/missing_dir/m.sfx"],
    ["run", "{d}/bomb.yaml", *TINY],
    ["run", "{d}/list_recipe.yaml", *TINY],
    ["run", "{d}/binary.yaml", *TINY],
    ["run", "{d}/bad_sparsity.yaml", *TINY],
    ["run", "{d}/unknown_pass.yaml", *TINY],
    ["run", "{d}/huge_number.yaml", *TINY],
    ["run", "{d}/typo_name.yaml", *TINY],
    ["inspect"],
    ["inspect", "{d}/missing.onnx"],
    ["inspect", "{d}/adir"],
    ["inspect", "{d}/garbage.onnx"],
    ["inspect", "{d}/traversal.onnx"],
    ["inspect", "{d}/garbage.sfx"],
    ["inspect", "{d}/empty.sfx"],
    ["inspect", "{d}/evil.sfx", "--input-shape", "2,4"],
    ["inspect", "{d}/good.sfx", "--input-shape", "2,9"],
    ["inspect", "{d}/pickled.pt"],
    ["inspect", "{d}/pickled_dict.pt", "--unsafe-pickle"],
]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_table")
    _files(path)
    return path


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a)[:60] or "<none>")
def test_bad_invocation_one_line_nonzero(argv, d, capsys):
    code = main([a.format(d=d) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("sparsifx: error:"), err
    assert "Traceback" not in err
    assert not (d / "canary").exists()


def test_table_is_broad():
    assert len(BAD) >= 28
