"""export_onnx: torchvision export + onnxruntime parity, masked layers, dynamic batch, mismatch -> BackendError."""

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx import BackendError
from sparsifx.backends import onnx_export
from sparsifx.masking import set_mask


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def resnet_gm():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    return sparsifx.trace(model, (torch.randn(1, 3, 32, 32),))


def test_resnet18_export_verifies_and_runs_any_batch(resnet_gm, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    info = sparsifx.export_onnx(resnet_gm, tmp_path / "r18.onnx", (x,))
    path = info.path
    assert path.is_file() and info.path == tmp_path / "r18.onnx"
    onnx.checker.check_model(str(path))
    assert [c.batch for c in info.checks] == [1, 3]  # example batch and a different one
    assert info.max_abs < 1e-4 and info.max_rel is not None
    assert info.file_bytes == path.stat().st_size and info.opset == onnx.load(str(path)).opset_import[0].version
    assert str(info) == str(path) and os.fspath(info) == str(path)  # usable where a path is expected
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch axis
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = resnet_gm.eval()(x5).numpy()
    np.testing.assert_allclose(_ort(path, x5), expected, rtol=1e-4, atol=1e-4)


def test_static_batch_export(resnet_gm, tmp_path):
    info = sparsifx.export_onnx(resnet_gm, tmp_path / "static.onnx", torch.randn(2, 3, 32, 32), dynamic_batch=False)
    assert onnx.load(str(info.path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert [c.batch for c in info.checks] == [2]


def _masked_resnet():
    torch.manual_seed(0)
    gm = sparsifx.trace(torchvision.models.resnet18().eval())
    fc_mask = (torch.rand(1000, 512) > 0.8).float()
    conv_mask = (torch.rand(64, 64, 3, 3) > 0.5).float()
    set_mask(gm, "fc", fc_mask)
    set_mask(gm, "layer1.0.conv1", conv_mask)
    return gm, fc_mask, conv_mask


def test_masked_model_exports_effective_weights(tmp_path):
    gm, fc_mask, conv_mask = _masked_resnet()
    training = gm.training
    x = torch.randn(1, 3, 32, 32)
    path = sparsifx.export_onnx(gm, tmp_path / "masked.onnx", (x,)).path
    assert gm.training == training and type(gm.fc).__name__ == "MaskedLinear"  # the input module is untouched
    data = onnx_export.inspect_onnx(path)
    counts = {r["name"]: r["nonzeros"] for r in data["initializers"]}
    assert counts["fc.weight"] == int(torch.count_nonzero(gm.fc.weight * fc_mask))
    assert not any("mask" in name for name in counts)  # masks baked, not exported
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Mul" not in ops  # no weight * mask arithmetic left in the file
    with torch.no_grad():
        expected = gm.eval()(x).numpy()
    np.testing.assert_allclose(_ort(path, x), expected, rtol=1e-4, atol=1e-4)
    assert data["total"]["nonzeros"] < data["total"]["params"]


def test_mismatch_raises_backend_error_with_observed_error(resnet_gm, tmp_path, monkeypatch):
    def perturbed_exporter(module, inputs, path, dynamic_batch, opset, n_out):
        import copy

        wrong = copy.deepcopy(module)
        with torch.no_grad():
            wrong.fc.bias.add_(0.5)
        onnx_export.EXPORTERS.get("torchscript")(wrong, inputs, path, dynamic_batch, opset, n_out)

    monkeypatch.setitem(onnx_export.EXPORTERS._items, "perturbed", perturbed_exporter)
    with pytest.raises(BackendError) as info:
        sparsifx.export_onnx(resnet_gm, tmp_path / "bad.onnx", torch.randn(1, 3, 32, 32), exporter="perturbed")
    msg = str(info.value)
    assert "does not match torch" in msg and "max abs error 0.5" in msg and "max rel error" in msg


def test_export_failure_names_each_exporter(tmp_path, monkeypatch):
    def broken(module, inputs, path, dynamic_batch, opset, n_out):
        raise RuntimeError("unsupported op foo")

    monkeypatch.setitem(onnx_export.EXPORTERS._items, "torchscript", broken)
    monkeypatch.setitem(onnx_export.EXPORTERS._items, "dynamo", broken)
    with pytest.raises(BackendError, match="torchscript exporter: RuntimeError: unsupported op foo .* dynamo exporter"):
        sparsifx.export_onnx(nn.Linear(4, 2), tmp_path / "x.onnx", torch.randn(2, 4))


def test_auto_falls_back_to_dynamo_when_torchscript_cannot_export(tmp_path):
    # adaptive pooling to a non-divisor size: the TorchScript exporter refuses, the dynamo exporter handles it
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(5), nn.Flatten(), nn.Linear(100, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    info = sparsifx.export_onnx(model, tmp_path / "pool.onnx", (x,))
    assert info.exporter == "dynamo"
    assert "torchscript exporter" in info.fallback_reason and "adaptive_avg_pool2d" in info.fallback_reason
    assert info.max_abs < 1e-4


def test_bad_arguments(tmp_path):
    with pytest.raises(BackendError, match="unknown ONNX exporter"):
        sparsifx.export_onnx(nn.Linear(2, 2), tmp_path / "a.onnx", torch.randn(1, 2), exporter="nope")
    with pytest.raises(BackendError, match="input tensor"):
        sparsifx.export_onnx(nn.Linear(2, 2), tmp_path / "a.onnx", (3,))
    with pytest.raises(BackendError, match="fails on the example inputs"):
        sparsifx.export_onnx(nn.Linear(2, 2), tmp_path / "a.onnx", torch.randn(1, 5))


def test_sparse_weights(tmp_path):
    gm, _, _ = _masked_resnet()
    x = torch.randn(1, 3, 32, 32)
    dense = sparsifx.export_onnx(gm, tmp_path / "dense.onnx", (x,))
    sparse = sparsifx.export_onnx(gm, tmp_path / "sparse.onnx", (x,), sparse_weights=True)
    assert sparse.file_bytes == sparse.path.stat().st_size < dense.path.stat().st_size
    assert sparse.max_abs < 1e-4


def test_sparse_weights_missing_helper_raises(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sparsifx.backends.sparse_onnx", None)  # import now raises ImportError
    with pytest.raises(BackendError, match="to_sparse_initializers"):
        sparsifx.export_onnx(nn.Linear(4, 2), tmp_path / "s.onnx", torch.randn(2, 4), sparse_weights=True)


def test_options_and_result_are_frozen_and_keywords_build_the_options(tmp_path, monkeypatch):
    """``export_onnx``'s keywords become one ExportOptions; the result is a frozen value; no module state."""
    import dataclasses

    seen = []
    real = onnx_export.export_with_options
    monkeypatch.setattr(onnx_export, "export_with_options", lambda *a: seen.append(a[3]) or real(*a))
    x = torch.randn(2, 4)
    info = onnx_export.export_onnx(
        nn.Linear(4, 2),
        tmp_path / "a.onnx",
        x,
        dynamic_batch=False,
        opset=17,
        rtol=1e-3,
        atol=1e-5,
        exporter="torchscript",
    )
    assert seen == [
        onnx_export.ExportOptions(
            exporter="torchscript", opset=17, dynamic_batch=False, parity=onnx_export.ParityCheck(rtol=1e-3, atol=1e-5)
        )
    ]
    assert info.exporter == "torchscript" and info.opset == 17 and info.fallback_reason == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.exporter = "dynamo"
    unverified = real(nn.Linear(4, 2), tmp_path / "b.onnx", x, onnx_export.ExportOptions(parity=None))
    assert unverified.checks == () and unverified.max_abs is None and not onnx_export.ExportOptions(parity=None).verify
    assert not any(isinstance(v, onnx_export.ExportResult) for v in vars(onnx_export).values())  # no module state
