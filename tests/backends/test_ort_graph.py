"""``OrtGraph``: a dense graph run by one onnxruntime session; saved as bytes, checked before a session reads them."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from onnx import TensorProto, helper

import sparsifx
from sparsifx.backends.ort_graph import OrtGraph
from sparsifx.errors import BackendError, SerializationError
from sparsifx.testing import randomize_constants

TOL = dict(rtol=1e-4, atol=1e-4)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        h = torch.relu(self.bn(self.conv(x))) + y
        return h, self.fc(h.mean((2, 3)))


def _model_and_inputs(batch=1):
    torch.manual_seed(0)
    model = randomize_constants(TwoHeads())[0].eval()
    return model, (torch.randn(batch, 3, 8, 8), torch.randn(batch, 8, 8, 8))


def test_matches_torch_at_other_batch_sizes():
    model, inputs = _model_and_inputs()
    ort = OrtGraph.from_module(model, inputs)
    assert (ort.n_inputs, ort.n_outputs) == (2, 2)
    for batch in (1, 3):
        _, xs = _model_and_inputs(batch)
        with torch.inference_mode():
            torch.testing.assert_close(ort(*xs), model(*xs), **TOL)


def test_saved_and_loaded_as_bytes(tmp_path):
    from passes.lower_whole_model import replace_with

    model, inputs = _model_and_inputs()
    gm = fx.symbolic_trace(model)
    replace_with(gm, OrtGraph.from_module(model, inputs))
    gm.graph.lint()
    sparsifx.save(gm, tmp_path / "m.sfx")
    loaded = sparsifx.load(tmp_path / "m.sfx")
    assert "_session" not in loaded.onnxruntime_graph.__dict__  # sessions are never saved
    with torch.inference_mode():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), **TOL)


def _one_node_model(op: str, domain: str = "") -> bytes:
    x = helper.make_tensor_value_info("in0", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("out0", TensorProto.FLOAT, [1, 4])
    node = helper.make_node(op, ["in0"], ["out0"], domain=domain)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets).SerializeToString()


@pytest.mark.parametrize(
    "data, match",
    [
        (b"not an onnx model at all", "not a valid ONNX model"),
        (_one_node_model("Relu", "com.example"), "no import rule"),
        (_one_node_model("Hardmax"), "no import rule"),
    ],
)
def test_hostile_models_are_refused(data, match):
    with pytest.raises(BackendError, match=match):
        OrtGraph(data, 1, 1)


def test_input_and_output_counts_must_match_the_model():
    with pytest.raises(BackendError, match="1 inputs and 1 outputs"):
        OrtGraph(_one_node_model("Relu"), 2, 1)


def test_tampered_file_is_refused_on_load(tmp_path):
    from passes.lower_whole_model import replace_with

    model, inputs = _model_and_inputs()
    gm = fx.symbolic_trace(model)
    replace_with(gm, OrtGraph.from_module(model, inputs))
    payload = sparsifx.serialization.to_payload(gm)
    key = payload["modules"]["onnxruntime_graph"]["buffers"]["model"]
    payload["tensors"][key] = torch.frombuffer(bytearray(_one_node_model("Hardmax")), dtype=torch.uint8).clone()
    torch.save(payload, tmp_path / "bad.sfx")
    with pytest.raises(SerializationError, match="no import rule"):
        sparsifx.load(tmp_path / "bad.sfx")


def test_inference_only():
    model, inputs = _model_and_inputs()
    ort = OrtGraph.from_module(model, inputs)
    with pytest.raises(BackendError, match="inference-only"):
        ort(inputs[0].clone().requires_grad_(), inputs[1])
    with pytest.raises(BackendError, match="float32"):
        ort(inputs[0].double(), inputs[1])
