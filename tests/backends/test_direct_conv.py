"""The direct sparse convolution (``backends/cpp_kernel.py``) against ``F.conv2d``, per kernel shape class."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.backends import cpp_kernel
from sparsifx.backends import sparse_conv as sparse_conv_module
from sparsifx.backends.fast_pool import FastMaxPool2d
from sparsifx.backends.sparse_conv import DirectSparseConv2d, block_major, direct_supported, geometry
from sparsifx.errors import BackendError

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")
TOL = dict(rtol=1e-4, atol=1e-4)

# name: (in, out, kernel, stride, padding, dilation, groups, h, w)
SHAPES = {
    "1x1": (16, 24, 1, 1, 0, 1, 1, 9, 11),
    "1x1_stride2": (16, 24, 1, 2, 0, 1, 1, 9, 9),
    "1x1_padded": (8, 8, 1, 1, 1, 1, 1, 5, 6),
    "3x3": (16, 24, 3, 1, 1, 1, 1, 9, 11),
    "3x3_no_padding": (8, 8, 3, 1, 0, 1, 1, 5, 5),
    "3x3_stride2_odd": (16, 24, 3, 2, 1, 1, 1, 9, 11),
    "3x3_stride2_even": (16, 24, 3, 2, 1, 1, 1, 8, 8),
    "3x3_stride3": (8, 8, 3, 3, 1, 1, 1, 10, 10),
    "3x3_dilated": (8, 12, 3, 1, 2, 2, 1, 10, 10),
    "5x5": (8, 12, 5, 1, 2, 1, 1, 7, 13),
    "7x7_stride2_stem": (3, 8, 7, 2, 3, 1, 1, 17, 17),
    "1x3_asymmetric": (8, 8, (1, 3), 1, (0, 1), 1, 1, 5, 6),
    "2x2_stride2": (8, 4, 2, 2, 0, 1, 1, 10, 7),
    "grouped": (16, 32, 3, 1, 1, 1, 4, 9, 11),
    "depthwise": (16, 16, 3, 1, 1, 1, 16, 9, 11),
    "depthwise_stride2": (16, 32, 3, 2, 1, 1, 16, 10, 9),
    "wide_row_tiles": (32, 16, 3, 1, 1, 1, 1, 30, 40),  # full 64-column tiles and a masked tail
    "3x3_stride2_wide": (8, 8, 3, 2, 1, 1, 1, 7, 45),  # stride-2 grid rows long enough for the vector copy
    "1x1_stride2_wide": (8, 8, 1, 2, 0, 1, 1, 6, 50),
}


def sparse_conv(cin, cout, k, s, p, d, g, density=0.3, bias=True):
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < density)
    return conv


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("block_bytes", [None, 64, 2048])  # default; one channel per block; a few channels per block
def test_direct_conv_matches_conv2d(name, batch, block_bytes, monkeypatch):
    if block_bytes is not None:
        monkeypatch.setattr(sparse_conv_module, "CHANNEL_BLOCK_BYTES", block_bytes)
    cin, cout, k, s, p, d, g, h, w = SHAPES[name]
    torch.manual_seed(hash(name) % 1000)
    conv = sparse_conv(cin, cout, k, s, p, d, g)
    x = torch.randn(batch, cin, h, w)
    layer = DirectSparseConv2d(conv, conv.weight)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), conv(x), **TOL)


@pytest.mark.parametrize("per_block", [1, 3, 16])
def test_block_major_order_keeps_each_rows_non_zeros(per_block):
    conv = sparse_conv(16, 8, 3, 1, 1, 1, 1, density=0.4)
    layer = DirectSparseConv2d(conv, conv.weight)
    off = torch.arange(layer.nnz, dtype=torch.int32)  # stands for each non-zero's own index
    ptr, order, val = block_major(layer.rowptr, layer.chan, off, layer.val, per_block)
    assert ptr.shape == (-(-16 // per_block), 9) and int(ptr[0, 0]) == 0 and int(ptr[-1, -1]) == layer.nnz
    assert bool((ptr.reshape(-1)[1:] >= ptr.reshape(-1)[:-1]).all())
    for b in range(ptr.shape[0]):
        for r in range(8):
            ks = order[ptr[b, r] : ptr[b, r + 1]].long()
            assert bool((layer.chan[ks] // per_block == b).all())
            assert bool(((ks >= layer.rowptr[r]) & (ks < layer.rowptr[r + 1])).all())
            torch.testing.assert_close(val[ptr[b, r] : ptr[b, r + 1]], layer.val[ks])


@pytest.mark.parametrize("name", ["1x1", "3x3", "3x3_stride2_odd", "grouped"])
def test_fused_residual_and_relu(name):
    cin, cout, k, s, p, d, g, h, w = SHAPES[name]
    conv = sparse_conv(cin, cout, k, s, p, d, g)
    x = torch.randn(2, cin, h, w)
    with torch.inference_mode():
        ref = conv(x)
        r = torch.randn_like(ref)
        torch.testing.assert_close(DirectSparseConv2d(conv, conv.weight, activation="relu")(x), ref.relu(), **TOL)
        torch.testing.assert_close(DirectSparseConv2d(conv, conv.weight, activation="relu6")(x), ref.clamp(0, 6), **TOL)
        torch.testing.assert_close(DirectSparseConv2d(conv, conv.weight, residual=True)(x, r), ref + r, **TOL)
        torch.testing.assert_close(
            DirectSparseConv2d(conv, conv.weight, activation="relu", residual=True)(x, r), (ref + r).relu(), **TOL
        )


def test_empty_rows_no_bias_and_all_zero_weight():
    conv = sparse_conv(8, 6, 3, 1, 1, 1, 1, density=0.2, bias=False)
    with torch.no_grad():
        conv.weight[2:4] = 0
    x = torch.randn(1, 8, 6, 7)
    with torch.inference_mode():
        torch.testing.assert_close(DirectSparseConv2d(conv, conv.weight)(x), conv(x), **TOL)
        zero = torch.zeros_like(conv.weight)
        assert DirectSparseConv2d(conv, zero)(x).abs().max() == 0


def test_new_input_sizes_and_state_dict_round_trip():
    conv = sparse_conv(8, 8, 3, 2, 1, 1, 1)
    layer = DirectSparseConv2d(conv, conv.weight)
    other = DirectSparseConv2d(conv, conv.weight * 2)
    with torch.inference_mode():
        other(torch.randn(1, 8, 9, 9))  # offsets planned for the old buffers
    other.load_state_dict(layer.state_dict())  # the plan is rebuilt and the buffers re-checked
    with torch.inference_mode():
        for h, w in ((9, 9), (16, 12), (5, 6)):
            x = torch.randn(1, 8, h, w)
            torch.testing.assert_close(layer(x), conv(x), **TOL)
            torch.testing.assert_close(other(x), conv(x), **TOL)


@pytest.mark.parametrize("breakage", ["chan", "tap", "rowptr", "bias"])
def test_corrupt_buffers_are_refused_before_the_kernel_reads_them(breakage):
    conv = sparse_conv(8, 8, 3, 1, 1, 1, 2)
    layer = DirectSparseConv2d(conv, conv.weight)
    with torch.no_grad():
        if breakage == "chan":
            layer.chan[-1] = 1_000_000
        elif breakage == "tap":
            layer.tap[0] = 9
        elif breakage == "rowptr":
            layer.rowptr[-1] += 5
        else:
            layer.bias = torch.zeros(3)
    with torch.inference_mode(), pytest.raises(BackendError, match="invalid sparse weight"):
        layer(torch.randn(1, 8, 6, 6))  # written before the first call: checked before the kernel runs


def test_corrupt_state_dict_is_refused():
    conv = sparse_conv(8, 8, 3, 1, 1, 1, 1)
    layer = DirectSparseConv2d(conv, conv.weight)
    with torch.inference_mode():
        layer(torch.randn(1, 8, 6, 6))
    state = layer.state_dict()
    state["chan"] = state["chan"].clone().fill_(77)
    layer.load_state_dict(state)
    with torch.inference_mode(), pytest.raises(BackendError, match="invalid sparse weight"):
        layer(torch.randn(1, 8, 6, 6))


def test_refuses_gradients_and_other_dtypes():
    conv = sparse_conv(4, 4, 3, 1, 1, 1, 1)
    layer = DirectSparseConv2d(conv, conv.weight)
    with pytest.raises(BackendError, match="inference-only"):
        layer(torch.randn(1, 4, 5, 5, requires_grad=True))
    with torch.inference_mode(), pytest.raises(BackendError, match="float32"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_string_padding_is_not_direct():
    assert direct_supported(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    assert not direct_supported(nn.Conv2d(8, 8, 3, padding="same"))
    assert direct_supported(nn.Conv2d(8, 16, 3, padding=1, groups=2))
    with pytest.raises(BackendError, match="smaller than its kernel"):
        geometry(2, 2, (5, 5), (1, 1), (0, 0), (1, 1))


@pytest.mark.parametrize(
    "shape,k,s,p",
    [
        ((2, 3, 9, 11), 3, 2, 1),
        ((1, 4, 8, 8), 2, 2, 0),
        ((1, 2, 7, 7), 3, 1, 1),
        ((1, 2, 10, 9), 3, 3, 0),
        ((1, 2, 7, 7), 5, 2, 2),
    ],
)
def test_fast_maxpool_matches_torch(shape, k, s, p):
    x = torch.randn(shape)
    with torch.inference_mode():
        torch.testing.assert_close(FastMaxPool2d(nn.MaxPool2d(k, s, p))(x), F.max_pool2d(x, k, s, p))


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_ort_conv_matches_conv2d_and_reloads(activation, tmp_path):
    import sparsifx
    from sparsifx.backends.ort_conv import OrtConv2d

    conv = sparse_conv(16, 16, 3, 2, 1, 1, 16)  # depthwise, strided
    layer = OrtConv2d(conv, conv.weight, activation=activation)
    x = torch.randn(2, 16, 9, 11)
    with torch.inference_mode():
        ref = conv(x)
        ref = ref.relu() if activation == "relu" else ref.clamp(0, 6) if activation == "relu6" else ref
        torch.testing.assert_close(layer(x), ref, **TOL)
    gm = sparsifx.trace(nn.Sequential(layer), (x,))  # OrtConv2d is a tracing leaf
    sparsifx.save(gm, tmp_path / "m.sfx")
    with torch.inference_mode():
        torch.testing.assert_close(sparsifx.load(tmp_path / "m.sfx")(x), ref, **TOL)
