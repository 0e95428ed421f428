"""save/load: plain-data GraphModule files, loadable with weights_only=True, identical outputs."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.errors import SparsifxError
from sparsifx.masking import set_mask
from sparsifx.registry import PASSES
from sparsifx.serialization import SerializationError, load, register_function, save, to_payload


def _build(name: str, size: int):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    return model, (x,)


def _shrunk(name: str, size: int):
    """Trace, prune 50% of channels and shrink (physically smaller layers)."""
    model, inputs = _build(name, size)
    gm = sparsifx.trace(model, inputs)
    dense_params = sum(p.numel() for p in gm.parameters())
    gm = PASSES.get("channel_prune").from_params({"ratio": 0.5})(gm).gm
    gm = PASSES.get("shrink").from_params({})(gm).gm
    assert sum(p.numel() for p in gm.parameters()) < 0.8 * dense_params
    return gm.eval(), inputs


def _roundtrip(gm, inputs, tmp_path):
    path = tmp_path / "model.sfx"
    save(gm, path)
    payload = torch.load(path, weights_only=True)  # no code in the file
    assert payload["format"] == "sparsifx.graphmodule"
    loaded = load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), gm(*inputs), rtol=0, atol=0)
    loaded.graph.lint()
    assert [n.name for n in loaded.graph.nodes] == [n.name for n in gm.graph.nodes]
    return loaded


@pytest.mark.parametrize(
    "name,size", [("resnet18", 32), ("mobilenet_v3_small", 32), ("shufflenet_v2_x0_5", 32), ("swin_t", 32)]
)
def test_shrunk_torchvision_roundtrip(name, size, tmp_path):
    gm, inputs = _shrunk(name, size)
    loaded = _roundtrip(gm, inputs, tmp_path)
    # the physical (shrunk) shapes survive
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in gm.state_dict().items() if k in loaded.state_dict()
    }
    # the original model classes are gone: only torch.nn / torchvision leaves
    assert not any(type(m).__module__.startswith("torchvision.models.resnet") for m in loaded.modules())


def test_vit_roundtrip_with_get_attr_parameters(tmp_path):
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()
    inputs = (torch.randn(2, 3, 32, 32),)
    gm = sparsifx.trace(model, inputs)
    loaded = _roundtrip(gm, inputs, tmp_path)
    assert isinstance(loaded.get_parameter("class_token"), nn.Parameter)
    assert isinstance(loaded.get_submodule("encoder.layers.encoder_layer_0.self_attention"), nn.MultiheadAttention)


def test_masked_layers_and_training_flags_roundtrip(tmp_path):
    model, inputs = _build("resnet18", 32)
    gm = sparsifx.trace(model, inputs)
    mask = (torch.rand_like(gm.conv1.weight) > 0.5).float()
    set_mask(gm, "conv1", mask)
    gm.train()
    gm.get_submodule("layer1.0.bn1").eval()
    path = tmp_path / "m.sfx"
    save(gm, path)
    loaded = load(path)
    assert type(loaded.conv1).__name__ == "MaskedConv2d"
    torch.testing.assert_close(loaded.conv1.mask, mask, rtol=0, atol=0)
    assert loaded.training and not loaded.get_submodule("layer1.0.bn1").training
    assert loaded.get_submodule("layer1.0.bn2").training
    loaded.eval(), gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), gm(*inputs), rtol=0, atol=0)


def _custom_op(x):
    return x * 2


torch.fx.wrap("_custom_op")


class _UsesCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return _custom_op(self.lin(x))


def test_unknown_function_refused_on_save_naming_node(tmp_path):
    gm = sparsifx.trace(_UsesCustom())
    with pytest.raises(SerializationError, match=r"node '_custom_op'.*allow-list") as info:
        save(gm, tmp_path / "x.sfx")
    assert isinstance(info.value, SparsifxError)


def test_registered_function_roundtrip(tmp_path):
    gm = sparsifx.trace(_UsesCustom())
    register_function(_custom_op)
    try:
        x = torch.randn(3, 4)
        loaded = _roundtrip(gm, (x,), tmp_path)  # asserts identical outputs and graph
        assert any(n.target is _custom_op for n in loaded.graph.nodes)
    finally:
        from sparsifx import serialization

        serialization._EXTRA_FUNCTIONS.clear()


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "torch.load",
        "torch.serialization.load",
        "builtins.eval",
        "torch.set_default_dtype",
        "torch.hub.load",
    ],
)
def test_file_with_non_allow_listed_target_refused(target, tmp_path):
    gm = sparsifx.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    payload = to_payload(gm)
    for rec in payload["graph"]:
        if rec["op"] == "call_module" and rec["target"] == "1":
            rec.update(op="call_function", target=target)
    path = tmp_path / "evil.sfx"
    torch.save(payload, path)
    with pytest.raises(SerializationError, match="allow-list|does not name"):
        load(path)


def test_file_with_non_allow_listed_module_class_or_method_refused(tmp_path):
    payload = to_payload(sparsifx.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU())))
    payload["modules"]["1"]["class"] = "subprocess.Popen"
    torch.save(payload, tmp_path / "a.sfx")
    with pytest.raises(SerializationError, match="module class 'subprocess.Popen'"):
        load(tmp_path / "a.sfx")
    payload = to_payload(sparsifx.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU())))
    payload["graph"][2].update(op="call_method", target="register_hook")
    torch.save(payload, tmp_path / "b.sfx")
    with pytest.raises(SerializationError, match="not a torch.Tensor method"):
        load(tmp_path / "b.sfx")


def test_module_with_hook_or_object_attribute_refused(tmp_path):
    gm = sparsifx.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    gm.get_submodule("0").register_forward_hook(lambda *a: None)
    with pytest.raises(SerializationError, match="module '0'.*hooks"):
        save(gm, tmp_path / "h.sfx")
    gm = sparsifx.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    gm.get_submodule("1").helper = object()
    with pytest.raises(SerializationError, match="module '1': attribute 'helper'"):
        save(gm, tmp_path / "o.sfx")


def test_not_a_graph_module_and_not_a_sparsifx_file(tmp_path):
    with pytest.raises(SerializationError, match="GraphModule"):
        save(nn.Linear(2, 2), tmp_path / "x.sfx")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(SerializationError, match="not a sparsifx"):
        load(tmp_path / "sd.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # a pickled class: never unpickled
    with pytest.raises(SerializationError, match="weights-only"):
        load(tmp_path / "pickled_module.pt")


def test_public_lazy_names_and_operator_targets(tmp_path):
    assert sparsifx.save is save and sparsifx.load is load
    gm = sparsifx.trace(_Residual())
    assert any(n.target is operator.add for n in gm.graph.nodes)
    _roundtrip(gm, (torch.randn(2, 3, 8, 8),), tmp_path)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x) + x
        return y[:, 1:, ...].flatten(1).softmax(dim=-1).to(torch.float32), y.shape[-1]
