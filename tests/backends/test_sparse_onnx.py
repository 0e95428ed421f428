"""Sparse ONNX initializers: files shrink with density, onnxruntime loads them and matches torch."""

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision

from sparsifx.backends.sparse_onnx import to_sparse_initializers
from sparsifx.errors import BackendError


def export(model, x) -> bytes:
    f = io.BytesIO()
    torch.onnx.export(
        model, (x,), f, dynamo=False, opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "batch"}}
    )
    return f.getvalue()


def run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def prune(model, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) >= sparsity).float())
    return model.eval()


@pytest.fixture(scope="module")
def resnet18_90():
    torch.manual_seed(0)
    model = prune(torchvision.models.resnet18(num_classes=10), 0.9)
    x = torch.randn(2, 3, 32, 32)
    return model, x, export(model, x)


@pytest.mark.parametrize("fmt,limit", [("bitmask", 0.2), ("coo", 0.36)])
def test_round_trip_resnet18(resnet18_90, fmt, limit):
    model, x, dense = resnet18_90
    sparse = to_sparse_initializers(onnx.load_from_string(dense), format=fmt)
    onnx.checker.check_model(sparse)
    data = sparse.SerializeToString()
    assert len(data) < limit * len(dense)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(run(data, x), ref, rtol=1e-4, atol=1e-4)
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run(data, x5), model(x5), rtol=1e-4, atol=1e-4)


def test_size_follows_density():
    sizes = []
    for sparsity in (0.5, 0.8, 0.95):
        torch.manual_seed(0)
        model = prune(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)), sparsity)
        x = torch.randn(3, 256)
        data = to_sparse_initializers(onnx.load_from_string(export(model, x))).SerializeToString()
        torch.testing.assert_close(run(data, x), model(x).detach(), rtol=1e-4, atol=1e-4)
        sizes.append(len(data))
    assert sizes[0] > sizes[1] > sizes[2]


def test_dense_and_small_weights_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3)).eval()
    prune(model[2], 0.9)  # small (768 weights): below min_numel
    proto = to_sparse_initializers(onnx.load_from_string(export(model, torch.randn(1, 256))))
    names = {i.name for i in proto.graph.initializer}
    assert not any(n.endswith("__bits") for n in names)
    assert len(proto.graph.sparse_initializer) == 0


def test_unknown_format():
    proto = onnx.load_from_string(export(nn.Linear(4, 4).eval(), torch.randn(1, 4)))
    with pytest.raises(BackendError, match="unknown sparse ONNX format"):
        to_sparse_initializers(proto, format="zip")


def test_bitmask_decode_matches_numpy():
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((37, 53)) * (np.random.default_rng(1).random((37, 53)) < 0.2)
    w = w.astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(w.shape))],
        [numpy_helper.from_array(w, "W")],
    )
    proto = to_sparse_initializers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {})[0], w)


@pytest.mark.slow
def test_export_onnx_sparse_weights(tmp_path):
    """``sparsifx.export_onnx(..., sparse_weights=True)`` stores bitmask initializers and still verifies."""
    import sparsifx

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    gm = sparsifx.sparsify(
        torchvision.models.resnet18(num_classes=10).eval(),
        {"stages": [{"pass": "magnitude", "sparsity": 0.9, "distribution": "erk"}]},
        example_inputs=(x,),
    )
    dense = sparsifx.export_onnx(gm, tmp_path / "dense.onnx", (x,)).path
    sparse = sparsifx.export_onnx(gm, tmp_path / "sparse.onnx", (x,), sparse_weights=True).path
    assert sparse.stat().st_size < 0.2 * dense.stat().st_size
    proto = onnx.load(str(sparse))
    assert any(i.name.endswith("__bits") for i in proto.graph.initializer)
    with torch.no_grad():
        torch.testing.assert_close(run(proto.SerializeToString(), x), gm(x), rtol=1e-4, atol=1e-4)
