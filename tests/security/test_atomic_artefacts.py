"""Artefacts appear whole or not at all: atomic_write, export_onnx over an existing file, the calibration cache."""

import json
import logging
import os

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx.atomic_io import atomic_write
from sparsifx.backends import cost_model, onnx_export
from sparsifx.errors import ArtefactError, BackendError, SparsifxError
from sparsifx.masking import set_mask
from sparsifx.passes.lower import Lower

X = torch.randn(2, 4)


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


# ---- atomic_write ----------------------------------------------------------------------------------------------
def test_atomic_write_replaces_only_after_the_check(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    seen = []
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"), lambda tmp: seen.append(tmp.read_bytes()))
    assert target.read_bytes() == b"new" and seen == [b"new"] and listing(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("fail_in", ["write", "check"])
@pytest.mark.parametrize("exc", [ValueError("bad"), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, fail_in, exc):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"partial")
        if fail_in == "write":
            raise exc

    def check(tmp):
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write, check)
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["a.bin"]


def test_atomic_write_keeps_the_existing_permissions(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.stat().st_mode & 0o777 == 0o640


def test_atomic_write_bad_directory_is_a_typed_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtefactError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "a.bin", lambda tmp: tmp.write_bytes(b"x"))
    with pytest.raises(ArtefactError, match="is not a directory"):
        atomic_write(tmp_path / "file" / "a.bin", lambda tmp: tmp.write_bytes(b"x"))

    def denied(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)  # root ignores chmod: simulate a read-only directory
    with pytest.raises(ArtefactError, match="not writable"):
        atomic_write(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert listing(tmp_path) == ["file"]


# ---- export_onnx -----------------------------------------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path):
    torch.manual_seed(0)
    path = onnx_export.export_onnx(nn.Linear(4, 3), tmp_path / "model.onnx", X).path
    return path, path.read_bytes()


def _perturbed(module, inputs, path, dynamic_batch, opset, n_out):
    """Exports a model whose outputs differ from the module's: onnxruntime verification fails."""
    import copy

    wrong = copy.deepcopy(module)
    with torch.no_grad():
        wrong.bias.add_(1.0)
    onnx_export.EXPORTERS.get("torchscript")(wrong, inputs, path, dynamic_batch, opset, n_out)


def _interrupted(module, inputs, path, dynamic_batch, opset, n_out):
    path.write_bytes(b"half an onnx file")
    raise KeyboardInterrupt


def _garbage(module, inputs, path, dynamic_batch, opset, n_out):
    path.write_bytes(b"not onnx")


class Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("forward fails")


@pytest.mark.parametrize(
    "exporter, model, error",
    [
        ("perturbed", nn.Linear(4, 3), BackendError),  # onnxruntime does not match torch
        ("garbage", nn.Linear(4, 3), BackendError),  # onnx.checker rejects the file
        ("interrupted", nn.Linear(4, 3), KeyboardInterrupt),  # Ctrl-C in the middle of the write
        ("auto", Raises(), BackendError),  # the model itself fails
    ],
)
def test_failed_export_leaves_the_good_file_untouched(good_file, monkeypatch, exporter, model, error):
    path, good = good_file
    for name, fn in (("perturbed", _perturbed), ("interrupted", _interrupted), ("garbage", _garbage)):
        monkeypatch.setitem(onnx_export.EXPORTERS._items, name, fn)
    with pytest.raises(error):
        onnx_export.export_onnx(model, path, X, exporter=exporter)
    assert path.read_bytes() == good
    assert listing(path.parent) == ["model.onnx"]  # no partial or temporary file


def test_successful_export_replaces_the_file(good_file):
    path, good = good_file
    torch.manual_seed(1)
    info = onnx_export.export_onnx(nn.Linear(4, 3), path, X)
    assert info.path == path
    assert path.read_bytes() != good and listing(path.parent) == ["model.onnx"]
    assert info.max_abs < 1e-4 and info.file_bytes == path.stat().st_size


def test_sparse_weights_export_is_atomic_too(tmp_path):
    model = sparsifx.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    set_mask(model, "0", (torch.rand(8, 4) > 0.5).float())
    path = onnx_export.export_onnx(model, tmp_path / "s.onnx", X, sparse_weights=True).path
    assert listing(tmp_path) == ["s.onnx"] and onnx_export.inspect_onnx(path)["total"]["nonzeros"]


def test_export_into_a_missing_directory_is_a_typed_error(tmp_path):
    with pytest.raises(SparsifxError, match="does not exist") as info:
        onnx_export.export_onnx(nn.Linear(4, 3), tmp_path / "missing" / "m.onnx", X)
    assert isinstance(info.value, ArtefactError) and "\n" not in str(info.value)
    assert listing(tmp_path) == []


# ---- calibration cache -----------------------------------------------------------------------------------------
@pytest.fixture
def fake_calibrate(monkeypatch):
    """A calibration without timing anything (dense is never beaten): fast and deterministic."""
    calls = []

    def calibrate(kernels, **kwargs):
        calls.append(kernels)
        table = {b: [(1.0, 0.01 * b), (1e6, 1.0 * b)] for b in (1, 32)}
        return cost_model.Calibration(
            cost_model.machine_key(kernels), torch.get_num_threads(), {k: table for k in kernels}, 1e-6, 1e-6, 0.01
        )

    monkeypatch.setattr(cost_model, "calibrate", calibrate)
    return calls


def masked_mlp():
    torch.manual_seed(0)
    gm = sparsifx.trace(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    set_mask(gm, "0", (torch.rand(32, 16) > 0.8).float())
    return gm


def lower(cache_dir):
    gm = masked_mlp()
    expected = gm(torch.ones(3, 16))
    result = Lower(cache_dir=str(cache_dir))(gm)
    torch.testing.assert_close(result.gm(torch.ones(3, 16)), expected)
    return result


def the_cache(directory):
    kernels = tuple(sorted(set(Lower().kernels) | {"dense"}))
    kernels = tuple(k for k in kernels if cost_model.SPARSE_KERNELS.get(k).available())
    return cost_model.cache_path(kernels, directory)


def test_a_valid_cache_is_reused(tmp_path, fake_calibrate):
    lower(tmp_path)
    lower(tmp_path)
    assert len(fake_calibrate) == 1 and listing(tmp_path) == [the_cache(tmp_path).name]


def _wrong_shape(key):
    return [
        [],
        {"key": key},
        {
            "key": key,
            "threads": 1,
            "linear": {"dense": {"1": "abc"}},
            "unfold_ms_per_elem": 0,
            "conv_dense_ms_per_mac": 0,
            "conv_dense_overhead_ms": 0,
        },
    ]


@pytest.mark.parametrize("case", ["corrupt", "truncated", "binary", "wrong_key", 0, 1, 2, "nan_point"])
def test_a_bad_cache_is_logged_recalibrated_and_replaced(tmp_path, fake_calibrate, caplog, case):
    path = the_cache(tmp_path)
    lower(tmp_path)  # a good cache to spoil
    good = json.loads(path.read_text())
    if case == "corrupt":
        path.write_text("{not json")
    elif case == "truncated":
        path.write_text(path.read_text()[:50])
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00")
    elif case == "wrong_key":
        path.write_text(json.dumps({**good, "key": "0" * 16}))
    elif case == "nan_point":
        bad = json.loads(path.read_text())
        bad["linear"]["dense"]["1"][0][1] = float("nan")
        path.write_text(json.dumps(bad))
    else:
        path.write_text(json.dumps(_wrong_shape(good["key"])[case]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lower(tmp_path)
    assert len(fake_calibrate) == 2
    assert any("invalid calibration cache" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text()) == good and listing(tmp_path) == [path.name]


def test_a_cache_directory_under_a_file_only_costs_the_cache(tmp_path, fake_calibrate, caplog):
    (tmp_path / "file").write_text("x")
    with caplog.at_level(logging.WARNING):
        lower(tmp_path / "file" / "cache")
    assert any("calibration not cached" in r.getMessage() for r in caplog.records)
    assert listing(tmp_path) == ["file"]


def test_a_read_only_cache_directory_only_costs_the_cache(tmp_path, fake_calibrate, caplog, monkeypatch):
    path = the_cache(tmp_path)
    path.write_text("{stale")

    def denied(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)  # root ignores chmod: simulate a read-only directory
    with caplog.at_level(logging.WARNING):
        lower(tmp_path)
    assert any("calibration not cached" in r.getMessage() for r in caplog.records)
    assert path.read_text() == "{stale" and listing(tmp_path) == [path.name]  # untouched, no temp file
