"""``load_onnx``: an ONNX file (dense with zeros, bitmask or COO sparse initializers) into the sparse runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
from onnx import TensorProto, helper, numpy_helper

import sparsifx
from sparsifx.backends import cpp_kernel, load_onnx
from sparsifx.backends.onnx_import import ImportLimits, OnnxImportError
from sparsifx.backends.ort_runtime import export_dense_onnx
from sparsifx.backends.sparse_conv import DirectSparseConv2d
from sparsifx.backends.sparse_onnx import to_sparse_initializers
from sparsifx.masking import bake_masks
from sparsifx.testing import randomize_constants

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")
TOL = dict(rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    randomize_constants(model)
    x = torch.randn(1, 3, 64, 64)
    pruned = sparsifx.sparsify(
        model, {"stages": [{"pass": "magnitude", "sparsity": 0.8}, {"pass": "fold_bn"}]}, example_inputs=(x,)
    ).eval()
    bake_masks(pruned)
    path = tmp_path_factory.mktemp("onnx") / "r18.onnx"
    export_dense_onnx(pruned, (x,), path)
    return path


def _ort(path, x):
    return torch.from_numpy(
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    )


@pytest.mark.parametrize("fmt", [None, "bitmask", "coo"])
def test_load_onnx_matches_onnxruntime(resnet_file, tmp_path, fmt):
    path = resnet_file
    if fmt is not None:
        path = tmp_path / f"r18_{fmt}.onnx"
        onnx.save(to_sparse_initializers(onnx.load(str(resnet_file)), format=fmt), str(path))
    gm = load_onnx(path, batch_size=2)
    assert sum(isinstance(m, DirectSparseConv2d) for m in gm.modules()) >= 1
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), _ort(resnet_file, x), **TOL)


def test_unlowered_import_and_saved_lowered_model_round_trip(resnet_file, tmp_path):
    plain = load_onnx(resnet_file, lower=False)
    assert not any(isinstance(m, DirectSparseConv2d) for m in plain.modules())
    lowered = load_onnx(resnet_file)
    sparsifx.save(lowered, tmp_path / "lowered.sfx")
    back = sparsifx.load(tmp_path / "lowered.sfx").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), lowered(x))
        torch.testing.assert_close(plain(x), _ort(resnet_file, x), **TOL)


def _tiny(nodes, inits, inputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_op_is_a_typed_error_naming_the_node(tmp_path):
    model = _tiny([helper.make_node("Celu", ["x"], ["y"], name="odd")], [])
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(OnnxImportError, match="node 'odd' \\(Celu\\): op has no import rule"):
        load_onnx(tmp_path / "m.onnx")


def test_external_data_oversized_and_garbage_files_are_refused(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    del w.external_data[:]
    w.external_data.add(key="location", value="../../etc/passwd")
    w.ClearField("raw_data")
    onnx.save(_tiny([helper.make_node("MatMul", ["x", "w"], ["y"])], [w]), str(tmp_path / "ext.onnx"))
    with pytest.raises(OnnxImportError, match="external data"):
        load_onnx(tmp_path / "ext.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not an onnx file" * 10)
    with pytest.raises(OnnxImportError, match="not a readable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")
    big = _tiny(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
    )
    onnx.save(big, str(tmp_path / "big.onnx"))
    with pytest.raises(OnnxImportError, match="size limit"):
        load_onnx(tmp_path / "big.onnx", limits=ImportLimits(max_elements=8))
    with pytest.raises(OnnxImportError, match="import limit"):
        load_onnx(tmp_path / "big.onnx", limits=ImportLimits(max_file_bytes=10))


def test_linear_gelu_layernorm_stack(tmp_path):
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.norm = nn.Linear(32, 64), nn.Linear(64, 32), nn.LayerNorm(32)

        def forward(self, x):
            return self.norm(x + self.fc2(nn.functional.gelu(self.fc1(x))))

    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        for fc in (model.fc1, model.fc2):
            fc.weight.mul_(torch.rand_like(fc.weight) > 0.8)
    x = torch.randn(2, 5, 32)
    torch.onnx.export(model, (x,), str(tmp_path / "mlp.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    gm = load_onnx(tmp_path / "mlp.onnx", batch_size=2)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), model(x), **TOL)


@pytest.mark.parametrize("opset", [17, 18])  # axes: an attribute up to opset 17, an input from 18
def test_reduce_mean(tmp_path, opset):
    class MeanPool(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)) + x.mean((1, 2, 3), keepdim=True).flatten(1)

    x = torch.randn(2, 3, 4, 4)
    path = tmp_path / "mean.onnx"
    torch.onnx.export(MeanPool(), (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"])
    gm = load_onnx(path, lower=False)
    torch.testing.assert_close(gm(x), MeanPool()(x), **TOL)
