"""Sparse kernels, lowered modules and the cost model: numerics against dense torch, dispatch, errors."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.backends import cost_model, cpp_build, cpp_kernel
from sparsifx.backends.sparse_kernels import SPARSE_KERNELS, get_kernel
from sparsifx.backends.sparse_modules import SparseConv2d, SparseLinear
from sparsifx.errors import BackendError

KERNELS = [k for k in SPARSE_KERNELS.names() if SPARSE_KERNELS.get(k).available()]
TOL = dict(rtol=1e-4, atol=1e-4)


def sparse_weight(out_f, in_f, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 64, 77])
def test_linear_matches_dense(name, density, batch):
    w, b = sparse_weight(40, 96, density), torch.randn(40)
    x = torch.randn(batch, 96)
    kernel = get_kernel(name)
    packed = kernel.pack(w)
    if name == "dense_ort":
        y = kernel.linear(x, packed, b, session=kernel.session(packed["weight"], b))
    else:
        y = kernel.linear(x, packed, b)
    torch.testing.assert_close(y, F.linear(x, w, b), **TOL)


@pytest.mark.parametrize("name", [k for k in KERNELS if SPARSE_KERNELS.get(k).supports_conv])
@pytest.mark.parametrize("cols", [1, 5, 64, 200])
def test_matmul_cols_matches_dense(name, cols):
    w, b = sparse_weight(24, 50, 0.2), torch.randn(24)
    X = torch.randn(3, 50, cols)
    y = get_kernel(name).matmul_cols(X, get_kernel(name).pack(w), b)
    torch.testing.assert_close(y, torch.matmul(w, X) + b.view(1, -1, 1), **TOL)


@pytest.mark.parametrize("in_f", [40000, 70000])  # uint16 indices above 32767, then int32 indices
def test_tiled_index_widths(in_f):
    w = sparse_weight(3, in_f, 0.01)
    packed = get_kernel("csr_tiled").pack(w)
    assert packed["col"].dtype == (torch.int16 if in_f <= 65536 else torch.int32)
    x = torch.randn(2, in_f)
    torch.testing.assert_close(get_kernel("csr_tiled").linear(x, packed, None), F.linear(x, w), **TOL)


def test_unknown_kernel_and_missing_compiler(monkeypatch):
    with pytest.raises(BackendError, match="unknown sparse kernel"):
        get_kernel("nope")
    monkeypatch.setattr(cpp_kernel.KERNELS, "_module", None)
    monkeypatch.setattr(cpp_build.shutil, "which", lambda _: None)
    with pytest.raises(BackendError, match="C\\+\\+ compiler"):
        cpp_kernel.load()


def test_sparse_linear_plan_dispatch_and_state():
    w, b = sparse_weight(32, 48, 0.1), torch.randn(32)
    layer = SparseLinear(w, b, [(2, "csr_tiled"), (16, "csr"), (None, "dense")])
    assert [layer.kernel_for(r) for r in (1, 2, 3, 16, 17, 500)] == ["csr_tiled"] * 2 + ["csr"] * 2 + ["dense"] * 2
    for rows in (1, 9, 40):
        x = torch.randn(rows, 48)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), F.linear(x, w, b), **TOL)
    x3 = torch.randn(2, 5, 48)  # leading dims are flattened and restored
    with torch.no_grad():
        torch.testing.assert_close(layer(x3), F.linear(x3, w, b), **TOL)
    clone = copy.deepcopy(layer)
    assert set(clone.state_dict()) == set(layer.state_dict())
    with pytest.raises(BackendError, match="inference-only"):
        layer(torch.randn(1, 48, requires_grad=True))
    with pytest.raises(BackendError, match="unbounded"):
        SparseLinear(w, b, [(4, "csr")])


def test_dense_ort_session_not_pickled():
    w = sparse_weight(8, 16, 0.5)
    layer = SparseLinear(w, None, [(None, "dense_ort")])
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        clone = copy.deepcopy(layer)  # the cached onnxruntime session must not be copied
        torch.testing.assert_close(clone(x), F.linear(x, w), **TOL)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=1),
        dict(kernel_size=1, stride=2),
        dict(kernel_size=3, dilation=2),
        dict(kernel_size=(1, 5), padding=(0, 2), bias=False),
    ],
)
@pytest.mark.parametrize("name", ["csr_tiled", "csr"])
def test_sparse_conv2d_matches(cfg, name):
    conv = nn.Conv2d(8, 12, **cfg)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
    lowered = SparseConv2d(conv, conv.weight, name)
    x = torch.randn(2, 8, 11, 9)
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), conv(x), **TOL)


def test_sparse_conv2d_rejects_groups():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(BackendError, match="groups=1"):
        SparseConv2d(conv, conv.weight, "csr_tiled")


def test_interp_and_crossover():
    pts = [(100, 1.0), (10000, 10.0)]
    assert cost_model._interp(pts, 50) == 1.0
    assert cost_model._interp(pts, 1000) == pytest.approx(10**0.5)
    assert cost_model._interp(pts, 20000) == pytest.approx(20.0)
    # dense: 10 ms for any 100x100 layer; sparse: 1 ms per 1000 non-zeros -> crossover at density 1.0 capped
    cal = cost_model.Calibration(
        "k", 1, {"dense": {1: [(1e4, 10.0), (1e6, 1000.0)]}, "csr_tiled": {1: [(1e3, 1.0), (1e5, 100.0)]}}
    )
    assert cal.crossover("csr_tiled", 100, 1) == pytest.approx(1.0, abs=1e-6)
    assert cal.crossover("csr_tiled", 1000, 1) == pytest.approx(1.0, abs=1e-6)
    cal.linear["csr_tiled"][1] = [(1e3, 5.0), (1e5, 500.0)]  # 5x the cost per non-zero: crossover at 20%
    assert cal.crossover("csr_tiled", 100, 1) == pytest.approx(0.2, abs=1e-3)
    again = cost_model.Calibration.from_json(cal.to_json())
    assert again.linear == cal.linear


def test_small_real_calibration(tmp_path):
    cal = cost_model.load_or_calibrate(("dense", "csr_tiled"), tmp_path, reps=3, sizes=(64, 256), batches=(1, 16))
    assert set(cal.linear) == {"dense", "csr_tiled"} and cal.batches == (1, 16)
    assert all(t > 0 for k in cal.linear for pts in cal.linear[k].values() for _, t in pts)
    assert list(tmp_path.glob("calibration-*.json"))
    assert cost_model.load_or_calibrate(("dense", "csr_tiled"), tmp_path).linear == cal.linear  # from cache


def test_a_faked_timer_never_reaches_the_calibration(tmp_path, monkeypatch):
    """Tests fake ``median_ms`` to steer lower's choices; a calibration run meanwhile (the first on a new kernel
    build) must still time for real, or the fake times are cached on disk for every later plan."""
    monkeypatch.setattr(cost_model, "median_ms", lambda fns, *a, **k: {name: 2.0 for name in fns})
    cal = cost_model.load_or_calibrate(("dense", "csr_tiled"), tmp_path, reps=3, sizes=(64, 256), batches=(1, 16))
    times = {t for k in cal.linear for pts in cal.linear[k].values() for _, t in pts}
    assert 2.0 not in times and len(times) > 1


def test_sparse_conv2d_chunked_unfold(monkeypatch):
    from sparsifx.backends import sparse_modules

    monkeypatch.setattr(sparse_modules, "UNFOLD_BYTES", 1)  # one sample per im2col block
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
    lowered = SparseConv2d(conv, conv.weight, "csr_tiled")
    x = torch.randn(5, 4, 7, 7)
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), conv(x), **TOL)


def test_sparse_linear_fast_path_runs_the_planned_kernel_per_row_count(monkeypatch):
    from sparsifx.backends import sparse_modules

    ran = []
    for name in ("csr_tiled", "csr", "dense"):
        monkeypatch.setitem(
            sparse_modules.BINDERS,
            name,
            lambda m, n: lambda x, n=n: ran.append(n) or torch.zeros(x.shape[0], m.out_features),
        )
    layer = SparseLinear(sparse_weight(8, 16, 0.3), None, [(2, "csr_tiled"), (16, "csr"), (None, "dense")])
    with torch.no_grad():
        for rows in (1, 2, 3, 16, 17, 300):
            assert layer(torch.randn(rows, 16)).shape == (rows, 8)
    assert ran == ["csr_tiled", "csr_tiled", "csr", "csr", "dense", "dense"]


def test_cache_evictor_writes_a_buffer_twice_the_last_level_cache():
    assert cost_model.last_level_cache_bytes() >= 1 << 20
    evict = cost_model.CacheEvictor()
    assert evict.buffer.numel() * 4 == 2 * cost_model.last_level_cache_bytes()
    small = cost_model.CacheEvictor(1 << 16)
    small()
    assert small.buffer.numel() == 1 << 14 and bool((small.buffer == 1.0).all())
