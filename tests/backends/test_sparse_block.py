"""The fused inverted-residual block (``backends/sparse_block.py``) against the three ``F.conv2d`` it replaces."""

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx.backends import cpp_kernel
from sparsifx.backends import sparse_block as sparse_block_module
from sparsifx.backends.sparse_block import SparseInvertedResidual, block_supported
from sparsifx.errors import BackendError

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")
TOL = dict(rtol=1e-4, atol=1e-4)
CLAMP = {None: lambda t: t, "relu": torch.relu, "relu6": lambda t: t.clamp(0, 6)}

# name: (in, expanded, out, kernel, stride, h, w, residual)
SHAPES = {
    "k3_residual": (8, 48, 8, 3, 1, 12, 10, True),
    "k3_stride2_even": (8, 48, 16, 3, 2, 12, 16, False),
    "k3_stride2_odd": (8, 48, 16, 3, 2, 11, 13, False),
    "k5_residual": (8, 40, 8, 5, 1, 9, 11, True),
    "k5_stride2_odd": (8, 40, 12, 5, 2, 9, 15, False),
    "k7_scalar_path": (4, 16, 4, 7, 1, 9, 9, True),
    "k3_stride3_scalar_path": (4, 16, 8, 3, 3, 10, 11, False),
    "narrow_3_wide": (8, 48, 8, 3, 1, 20, 3, True),
    "one_pixel": (8, 32, 8, 3, 1, 1, 1, True),
    "wide_rows": (4, 24, 8, 3, 1, 5, 70, False),  # full 64-column tiles and a masked tail
}


def convs(cin, ce, cout, k, s, density=0.3, dw_density=1.0):
    expand, project = nn.Conv2d(cin, ce, 1), nn.Conv2d(ce, cout, 1)
    depthwise = nn.Conv2d(ce, ce, k, s, k // 2, groups=ce)
    with torch.no_grad():
        for conv in (expand, project):
            conv.weight.mul_(torch.rand_like(conv.weight) < density)
        depthwise.weight.mul_(torch.rand_like(depthwise.weight) < dw_density)
    return expand, depthwise, project


def reference(x, expand, depthwise, project, activations, residual):
    y = project(CLAMP[activations[1]](depthwise(CLAMP[activations[0]](expand(x)))))
    return y + x if residual else y


def block_of(expand, depthwise, project, activations=("relu6", "relu6"), residual=False):
    weights = (expand.weight, depthwise.weight, project.weight)
    return SparseInvertedResidual((expand, depthwise, project), weights, activations, residual)


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("band", ["default", "one_row"])  # one output row per band: rows carried between bands
@pytest.mark.parametrize("dw_density", [1.0, 0.3])  # a pruned depthwise filter runs only its non-zero taps
def test_block_matches_three_convolutions(name, batch, band, dw_density, monkeypatch):
    if band == "one_row":
        monkeypatch.setattr(sparse_block_module, "BAND_BYTES", 1)
        monkeypatch.setattr(sparse_block_module, "BAND_COLUMNS", 1)
    cin, ce, cout, k, s, h, w, residual = SHAPES[name]
    torch.manual_seed(hash(name) % 1000)
    expand, depthwise, project = convs(cin, ce, cout, k, s, dw_density=dw_density)
    x = torch.randn(batch, cin, h, w)
    block = block_of(expand, depthwise, project, residual=residual)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), reference(x, expand, depthwise, project, ("relu6",) * 2, residual), **TOL)


@pytest.mark.parametrize("activations", [(None, None), ("relu", None), (None, "relu6")])
@pytest.mark.parametrize("threads", [1, 2])
def test_activations_and_threads(activations, threads):
    torch.manual_seed(0)
    expand, depthwise, project = convs(8, 32, 8, 3, 1)
    for conv in (expand, depthwise, project):
        conv.bias = None
    x = torch.randn(1, 8, 17, 9)
    block = block_of(expand, depthwise, project, activations, residual=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one image split into runs of rows: the rows at each split are recomputed
    try:
        with torch.inference_mode():
            torch.testing.assert_close(block(x), reference(x, expand, depthwise, project, activations, True), **TOL)
    finally:
        torch.set_num_threads(before)


def test_all_zero_weights_and_save_load_round_trip(tmp_path):
    expand, depthwise, project = convs(8, 32, 16, 3, 2)
    x = torch.randn(2, 8, 9, 9)
    zero = block_of(expand, depthwise, project)
    with torch.no_grad():
        project.weight.zero_()
    with torch.inference_mode():
        expected = project.bias.view(1, -1, 1, 1).expand(2, -1, 5, 5)
        torch.testing.assert_close(block_of(expand, depthwise, project)(x), expected)
    gm = sparsifx.trace(nn.Sequential(zero), (x,))  # a tracing leaf, saved without pickle
    sparsifx.save(gm, tmp_path / "b.sfx")
    with torch.inference_mode():
        torch.testing.assert_close(sparsifx.load(tmp_path / "b.sfx")(x), zero(x), **TOL)


@pytest.mark.parametrize("breakage", ["e_col", "p_col", "e_ptr", "dw", "p_bias"])
def test_corrupt_buffers_are_refused_before_the_kernel_reads_them(breakage):
    block = block_of(*convs(8, 32, 8, 3, 1))
    with torch.no_grad():
        if breakage == "e_col":
            block.e_col[-1] = 1_000_000
        elif breakage == "p_col":
            block.p_col[0] = 32
        elif breakage == "e_ptr":
            block.e_ptr[-1] += 5
        elif breakage == "dw":
            block.dw = torch.zeros(32, 4)
        else:
            block.p_bias = torch.zeros(3)
    with torch.inference_mode(), pytest.raises(BackendError):
        block(torch.randn(1, 8, 6, 6))


def test_corrupt_state_dict_is_refused():
    block = block_of(*convs(8, 32, 8, 3, 1))
    with torch.inference_mode():
        block(torch.randn(1, 8, 6, 6))
    state = block.state_dict()
    state["p_col"] = state["p_col"].clone().fill_(999)
    block.load_state_dict(state)
    with torch.inference_mode(), pytest.raises(BackendError, match="invalid sparse weight"):
        block(torch.randn(1, 8, 6, 6))


def test_refusals():
    expand, depthwise, project = convs(8, 32, 8, 3, 1)
    block = block_of(expand, depthwise, project)
    with pytest.raises(BackendError, match="inference-only"):
        block(torch.randn(1, 8, 5, 5, requires_grad=True))
    with torch.inference_mode(), pytest.raises(BackendError, match="float32"):
        block(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with torch.inference_mode(), pytest.raises(BackendError, match="8 channels"):
        block(torch.randn(1, 4, 5, 5))
    assert block_supported(nn.Conv2d(8, 32, 3), depthwise, project) is not None  # expand is not 1x1
    assert block_supported(expand, nn.Conv2d(32, 32, 3, padding=1), project) is not None  # not depthwise
    assert block_supported(expand, nn.Conv2d(32, 32, 4, padding=2, groups=32), project) is not None  # even kernel
    assert block_supported(expand, nn.Conv2d(32, 32, 3, padding=0, groups=32), project) is not None  # not "same"
    with pytest.raises(BackendError, match="residual"):
        block_of(*convs(8, 32, 8, 3, 2), residual=True)
