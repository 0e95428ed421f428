"""CI-sized trace sweep: a few small torchvision models through trace, eager parity and ONNX parity,
using the functions of benchmarks/trace_sweep.py (the full 80-model run is the benchmark itself)."""

import json

import pytest


@pytest.fixture(scope="module")
def sweep(load_benchmark):
    return load_benchmark("trace_sweep")


@pytest.mark.parametrize("name", ["squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5"])
def test_small_model_traces_and_matches_eager_and_onnx(sweep, name, tmp_path):
    rec = sweep.sweep_one(name, workdir=tmp_path)
    assert rec["error"] is None, rec["error"]
    assert rec["traced"] and rec["eager_parity"] and rec["onnx_ok"]
    assert rec["input_shape"] == [1, 3, 64, 64]
    assert rec["opaque_leaves"] == []
    assert rec["eager_max_abs"] == 0.0  # the GraphModule runs the very same ops
    assert rec["onnx_batches"] == [1, 3]
    assert rec["onnx_max_abs"] <= rec["onnx_atol"] + 1e-4 * rec["output_max_abs"]
    assert (
        rec["output_max_abs"] > 0
    )  # calibrated_random_weights() re-draws all-zero weight matrices: outputs are informative
    json.dumps(rec)


def test_failures_are_named_and_tabulated(sweep, tmp_path, monkeypatch):
    rec = sweep.sweep_one("not_a_model")
    assert rec["error"].startswith("build: ") and not rec["traced"]
    records = [
        rec,
        {
            "model": "m",
            "input_shape": [1, 3, 64, 64],
            "params": 10,
            "traced": True,
            "eager_parity": True,
            "onnx_ok": True,
            "error": None,
            "onnx_exporter": "torchscript",
            "onnx_max_abs": 1e-6,
            "onnx_atol": 1e-4,
            "onnx_tol_basis": "output scale",
            "opaque_leaves": ["a.b"],
        },
    ]
    s = sweep.summary(records)
    assert s == {
        "models": 2,
        "traced": 1,
        "eager_parity": 1,
        "onnx_parity": 1,
        "failures": {"not_a_model": rec["error"]},
    }
    text = sweep.markdown(records, {"torch": "t", "torchvision": "v"})
    assert "2 models: 1 traced" in text and "| m | 64 |" in text and "a.b" in text and "build: " in text
    out = tmp_path / "s.json"
    sweep.write(records, out)
    assert json.loads(out.read_text())["summary"]["traced"] == 1 and out.with_suffix(".md").is_file()
