"""CLI model sources ``timm:NAME`` and ``hf:TYPE_OR_CONFIG``: random weights, no network, one-line errors, and a
clear message when the extra is not installed."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from sparsifx.cli import HF_TINY, CliError, build, main

RECIPE = "stages:\n  - pass: magnitude\n    sparsity: 0.5\n"


@pytest.fixture()
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def _run_json(argv, capsys) -> dict:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _one_line_error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("sparsifx: error:"), err
    return err


# --- timm ---------------------------------------------------------------------------------------------------------
def test_timm_source(recipe, capsys):
    timm = pytest.importorskip("timm")
    built = build("timm:test_resnet")
    assert isinstance(built.model, timm.models.ResNet)
    assert tuple(built.inputs[0].shape) == (1, *built.model.pretrained_cfg["input_size"])  # the model's own size
    data = _run_json(["run", str(recipe), "--model", "timm:test_resnet", "--input-shape", "1,3,32,32"], capsys)
    assert data["input_shapes"] == [[1, 3, 32, 32]] and data["totals"]["macs"] > 0
    assert data["totals"]["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_timm_unknown_model(recipe, capsys):
    pytest.importorskip("timm")
    err = _one_line_error(["run", str(recipe), "--model", "timm:test_resnt"], capsys)
    assert "unknown timm model 'test_resnt'" in err and "test_resnet" in err  # suggests the close match


# --- transformers -------------------------------------------------------------------------------------------------
@pytest.fixture()
def no_hub(monkeypatch):
    """Any from_pretrained call fails the test: the hf: source must build from configs only."""
    transformers = pytest.importorskip("transformers")

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_pretrained called with {args!r}")

    for cls in (
        transformers.AutoConfig,
        transformers.AutoModel,
        transformers.PreTrainedModel,
        transformers.PretrainedConfig,
    ):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return transformers


def test_hf_model_type_is_tiny_and_traced(recipe, capsys, no_hub):
    built = build("hf:bert")
    assert isinstance(built.model, torch.fx.GraphModule) and built.onnx_kwargs == {"dynamic_batch": False}
    assert built.inputs[0].shape == (1, 16) and built.inputs[0].dtype == torch.long
    layers = built.model.get_submodule("encoder.layer")  # AutoModel: the bare BertModel
    assert len(list(layers.children())) == HF_TINY["num_hidden_layers"]
    assert layers.get_submodule("0").attention.self.query.in_features == HF_TINY["hidden_size"]
    data = _run_json(["run", str(recipe), "--model", "hf:bert", "--input-shape", "2,8"], capsys)
    assert data["input_shapes"] == [[2, 8]]
    query = next(r for r in data["layers"] if r["name"].endswith("layer.0.attention.self.query"))
    assert query["type"] == "MaskedLinear" and query["macs"] == 2 * 8 * 64 * 64


def test_hf_config_file_and_directory(recipe, tmp_path, capsys, no_hub):
    config = {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification"],
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 48,
        "vocab_size": 50,
        "num_labels": 3,
    }
    path = tmp_path / "cfg" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    for spec in (str(path), str(path.parent)):
        built = build(f"hf:{spec}")
        assert len(list(built.model.get_submodule("bert.encoder.layer").children())) == 1  # architectures' class
        assert built.model.get_submodule("classifier").out_features == 3
    out = tmp_path / "bert.onnx"
    data = _run_json(["run", str(recipe), "--model", f"hf:{path.parent}", "--onnx", str(out)], capsys)
    assert out.is_file() and data["totals"]["params"] > 0


def test_hf_vision_model_gets_pixel_values(no_hub):
    built = build("hf:vit")
    assert built.inputs[0].shape == (1, 3, 224, 224)  # ViTConfig's num_channels and image_size
    assert built.inputs[0].is_floating_point()


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("hf:bertt", "unknown transformers model type 'bertt'"),
        ("hf:./no/such/config.json", "hf: no config file at './no/such/config.json'"),
    ],
)
def test_hf_bad_specs(spec, expected, recipe, capsys, no_hub):
    assert expected in _one_line_error(["run", str(recipe), "--model", spec], capsys)


def test_hf_bad_config_and_shape(recipe, tmp_path, capsys, no_hub):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "not-a-type"}))
    assert "'model_type' must name a transformers model type" in _one_line_error(
        ["run", str(recipe), "--model", f"hf:{bad}"], capsys
    )
    bad.write_text("{not json")
    assert "not a readable JSON config" in _one_line_error(["run", str(recipe), "--model", f"hf:{bad}"], capsys)
    assert "batch,sequence" in _one_line_error(
        ["run", str(recipe), "--model", "hf:bert", "--input-shape", "1,3,8,8"], capsys
    )


# --- extras missing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,module,extra", [("timm:resnet18", "timm", "timm"), ("hf:bert", "transformers", "hf")])
def test_missing_extra_is_a_clear_error(spec, module, extra, recipe, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(CliError, match=rf"pip install sparsifx\[{extra}\]"):
        build(spec)
    err = _one_line_error(["run", str(recipe), "--model", spec], capsys)
    assert f"needs {module}, which is not installed" in err and f"sparsifx[{extra}]" in err


# --- progress bars of the long steps ------------------------------------------------------------------------------
def test_progress_follows_env_and_terminal(monkeypatch):
    import io

    from sparsifx import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("SPARSIFX_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled()
    assert list(progress.progress(range(3), desc="x")) == [0, 1, 2]
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.enabled()
    monkeypatch.setenv("SPARSIFX_PROGRESS", "0")
    assert not progress.enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("SPARSIFX_PROGRESS", "1")
    assert progress.enabled()
    list(progress.progress(range(3), desc="counting"))
    assert "counting" in sys.stderr.getvalue()


def test_cli_run_progress_only_when_asked(recipe, tmp_path, capsys, monkeypatch):
    (tmp_path / "progress_tiny_model.py").write_text(
        "import torch.nn as nn\ndef make():\n    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["run", str(recipe), "--model", "python:progress_tiny_model:make", "--input-shape", "2,8"]
    monkeypatch.delenv("SPARSIFX_PROGRESS", raising=False)
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar
    monkeypatch.setenv("SPARSIFX_PROGRESS", "1")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "sparsifx run" in captured.err and "sparsifx report" in captured.out
