"""Masked layers: recompute-in-backward training ops match ``F.linear/conv(x, W*M)`` autograd and save less."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from sparsifx.accounting import saved_tensor_bytes
from sparsifx.masking import effective_weight, masked_layers, set_mask


def _random_mask(weight: torch.Tensor, density: float = 0.4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(weight.shape, generator=g) < density).float()


def _reference(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, dense_grad: bool) -> torch.Tensor:
    w_eff = w + (w * layer.mask - w).detach() if dense_grad else w * layer.mask
    if isinstance(layer, nn.Linear):
        return F.linear(x, w_eff, layer.bias_ref)
    return F.conv2d(x, w_eff, layer.bias_ref, layer.stride, layer.padding, layer.dilation, layer.groups)


def _check_against_reference(dense: nn.Module, x: torch.Tensor, dense_grad: bool) -> None:
    root = nn.Sequential(dense)
    layer = set_mask(root, "0", _random_mask(dense.weight))
    layer.dense_grad = dense_grad
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    layer.bias_ref = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn_like(layer(x1))
    out = layer(x1)
    ref = _reference(layer, x2, w_ref, dense_grad)
    torch.testing.assert_close(out, ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, layer.bias_ref.grad)
    pruned = layer.mask == 0
    assert pruned.any()
    if dense_grad:
        assert layer.weight.grad[pruned].abs().sum() > 0  # straight-through: pruned weights get gradient
    else:
        assert torch.all(layer.weight.grad[pruned] == 0)


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_linear_matches_reference(dense_grad, bias, shape):
    torch.manual_seed(0)
    _check_against_reference(nn.Linear(12, 7, bias=bias), torch.randn(shape), dense_grad)


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "conf",
    [
        dict(stride=2, padding=1),
        dict(padding=2, dilation=2),
        dict(stride=2, padding=1, groups=2),
        dict(padding=(1, 0), stride=(1, 2)),
    ],
)
def test_conv2d_matches_reference(dense_grad, bias, conf):
    torch.manual_seed(0)
    _check_against_reference(nn.Conv2d(4, 6, 3, bias=bias, **conf), torch.randn(2, 4, 9, 10), dense_grad)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_padding_modes_match_dense_conv_with_masked_weight(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    ref = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    root = nn.Sequential(conv)
    mask = _random_mask(conv.weight)
    layer = set_mask(root, "0", mask)
    with torch.no_grad():
        ref.weight.copy_(conv.weight * mask)
        ref.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    out, out_ref = layer(x), ref(xr)
    torch.testing.assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad * mask)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("conv_cls, shape", [(nn.Conv1d, (2, 4, 11)), (nn.Conv3d, (1, 4, 5, 6, 7))])
def test_conv1d_conv3d_match_dense_with_masked_weight(conv_cls, shape):
    torch.manual_seed(0)
    conv, ref = conv_cls(4, 6, 3, stride=2, padding="valid"), conv_cls(4, 6, 3, stride=2)
    mask = _random_mask(conv.weight)
    layer = set_mask(nn.Sequential(conv), "0", mask)
    with torch.no_grad():
        ref.weight.copy_(conv.weight * mask)
        ref.bias.copy_(conv.bias)
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(layer(x), ref(xr))
    layer(x).sum().backward()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad * mask)


def _mlp(widths=(784, 512, 512, 10)) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def test_masked_mlp_saves_no_more_than_dense():
    torch.manual_seed(0)
    dense = _mlp()
    masked = _mlp()
    masked.load_state_dict(dense.state_dict())
    for name, m in list(masked.named_modules()):
        if isinstance(m, nn.Linear):
            set_mask(masked, name, _random_mask(m.weight, 0.1))
    x = torch.randn(16, 784)
    dense_bytes = saved_tensor_bytes(dense, (x,))
    masked_bytes = saved_tensor_bytes(masked, (x,))
    weight_bytes = sum(m.weight.numel() * 4 for m in dense.modules() if isinstance(m, nn.Linear))
    assert masked_bytes <= dense_bytes
    assert masked_bytes < weight_bytes  # no dense-size W*M copy is kept (the old path kept all of them)
    for _, layer in masked_layers(masked):
        layer.dense_grad = True
    assert saved_tensor_bytes(masked, (x,)) <= dense_bytes


def test_no_grad_and_inference_mode_use_plain_path():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    set_mask(root, "0", _random_mask(root[0].weight))
    set_mask(root, "2", _random_mask(root[2].weight))
    x = torch.randn(2, 3, 8, 8)
    expected = F.linear(
        F.conv2d(x, effective_weight(root[0]), root[0].bias).flatten(1), effective_weight(root[2]), root[2].bias
    )
    with torch.no_grad():
        out = root(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected.detach())
    with torch.inference_mode():
        torch.testing.assert_close(root(x), expected.detach())
    train_out = root(x)
    assert type(train_out.grad_fn).__name__ == "MaskedLinearFnBackward"
    torch.testing.assert_close(train_out, expected)


def test_masked_resnet18_exports_to_onnx(tmp_path):
    from sparsifx import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for name, m in list(model.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            set_mask(model, name, _random_mask(m.weight, 0.5))
    x = torch.randn(1, 3, 32, 32)
    path = export_onnx(model, tmp_path / "resnet18_masked.onnx", (x,), verify=True).path  # raises on mismatch
    assert path.exists() and sum(1 for _ in masked_layers(model)) == 21  # the input model stays masked


def test_torch_export_of_unbaked_masked_layer_uses_plain_path():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(8, 4))
    set_mask(root, "0", _random_mask(root[0].weight))
    x = torch.randn(3, 8)
    ep = torch.export.export(root, (x,))  # grad enabled, weight requires grad: still the traceable path
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("mul" in t for t in targets) and any("linear" in t or "addmm" in t for t in targets)
    torch.testing.assert_close(ep.module()(x), F.linear(x, root[0].weight * root[0].mask, root[0].bias))


def test_autocast_bf16_training_matches_reference_and_keeps_grad_dtypes():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    set_mask(root, "0", _random_mask(root[0].weight))
    set_mask(root, "2", _random_mask(root[2].weight))
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = root(x)
        ref = F.linear(
            F.conv2d(x, root[0].weight * root[0].mask, root[0].bias, padding=1).flatten(1),
            root[2].weight * root[2].mask,
            root[2].bias,
        )
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    ref_grads = torch.autograd.grad(ref.float().sum(), [root[0].weight, root[2].weight, root[2].bias])
    out.float().sum().backward()
    for got, want in zip([root[0].weight.grad, root[2].weight.grad, root[2].bias.grad], ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
