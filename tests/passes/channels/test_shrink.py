"""``shrink``: torchvision models at small sizes shrink exactly (shrunk == masked), plus pass contracts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

from sparsifx.api import sparsify
from sparsifx.errors import PreconditionError
from sparsifx.masking import set_mask
from sparsifx.pass_manager import run_model
from sparsifx.passes.channels import ChannelPrune, Shrink
from sparsifx.testing import n_params, prune_and_shrink
from sparsifx.tracing import trace


def image(size: int) -> tuple[torch.Tensor]:
    torch.manual_seed(0)
    return (torch.randn(1, 3, size, size),)


def _vit_tiny():
    model = tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initializes the head
    return model


def _convnext_small_config():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10)


SMALL = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), 32),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), 32),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), 32),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(num_classes=10), 32),
    "convnext": (_convnext_small_config, 32),
    "vit_tiny": (_vit_tiny, 32),
    "swin_tiny": (lambda: tvm.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10), 32),
    "swin_v2_tiny": (
        lambda: tvm.SwinTransformer(
            [4, 4],
            16,
            [2, 2],
            [2, 4],
            [4, 4],
            num_classes=10,
            block=SwinTransformerBlockV2,
            downsample_layer=PatchMergingV2,
        ),
        32,
    ),
    "maxvit_tiny": (
        lambda: tvm.MaxVit((32, 32), 16, 2, [16, 32], [1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10),
        32,
    ),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_torchvision_models_shrink_exactly(name):
    build, size = SMALL[name]
    gm, _, out = prune_and_shrink(build(), image(size))
    assert out.shape == (1, 10)
    assert gm.meta["channel_report"]["removed_units"] > 0


def test_resnet18_layers_halve():
    gm, _, _ = prune_and_shrink(tvm.resnet18(num_classes=10), image(32))
    assert gm.conv1.out_channels == 32 and gm.get_submodule("layer1.0.conv1").out_channels == 32
    assert gm.fc.in_features == 256 and gm.fc.out_features == 10


def test_maxvit_attention_prunes_within_head_dims():
    build, size = SMALL["maxvit_tiny"]
    gm, _, _ = prune_and_shrink(build(), image(size))
    qkv = [m for n, m in gm.named_modules() if n.endswith("to_qkv")]
    assert qkv and all(m.out_features < 3 * m.in_features for m in qkv)


def test_vit_attention_is_decomposed_and_pruned():
    gm, _, _ = prune_and_shrink(_vit_tiny(), image(32))
    q = gm.get_submodule("encoder.layers.encoder_layer_0.self_attention.q_proj")
    assert q.in_features == 32 and q.out_features < 32
    assert not any("MultiheadAttention" in b["reason"] for b in gm.meta["channel_barriers"])


def test_shrink_without_plan_raises_a_precondition_error():
    gm = trace(tvm.resnet18(num_classes=10).eval(), image(32))
    code = gm.code
    with pytest.raises(PreconditionError, match=r"channel_plan.*run 'channel_prune' before 'shrink'"):
        Shrink()(gm)
    with pytest.raises(PreconditionError, match="channel_plan"):
        sparsify(tvm.resnet18(num_classes=10).eval(), {"stages": [{"pass": "shrink"}]}, example_inputs=image(32))
    assert gm.code == code


def test_stale_plan_is_refused():
    gm = trace(tvm.resnet18(num_classes=10).eval(), image(32))
    ChannelPrune(ratio=0.5)(gm)
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    with gm.graph.inserting_after(node):
        relu = gm.graph.call_function(torch.relu, (node,))
    node.replace_all_uses_with(relu, delete_user_cb=lambda u: u is not relu)
    gm.recompile()
    with pytest.raises(PreconditionError, match="stale"):
        Shrink()(gm)


def test_recipe_with_verification():
    x = image(32)
    gm = sparsify(
        tvm.mobilenet_v2(num_classes=10),
        {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]},
        example_inputs=x,
        verify=True,
    )
    assert [(h.name, h.modified, h.verified) for h in gm.meta["history"]] == [
        ("channel_prune", True, False),
        ("shrink", True, True),
    ]
    assert n_params(gm) < n_params(tvm.mobilenet_v2(num_classes=10)) * 0.5


def test_masked_layers_slice_their_masks():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).eval()
    x = (torch.randn(2, 3, 8, 8),)
    gm = trace(model, x)
    set_mask(gm, "3", (torch.rand(8, 16, 3, 3) > 0.3).float())
    ChannelPrune(ratio=0.5)(gm)
    masked = run_model(gm, x)
    assert Shrink()(gm).modified
    conv = gm.get_submodule("3")
    assert conv.mask.shape == conv.weight.shape == (4, 8, 3, 3)
    torch.testing.assert_close(run_model(gm, x), masked)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,size",
    [
        ("resnext50_32x4d", 64),
        ("densenet121", 64),
        ("googlenet", 64),
        ("inception_v3", 96),
        ("swin_t", 112),
        ("vit_b_16", 224),
        ("maxvit_t", 224),
        ("shufflenet_v2_x1_0", 64),
    ],
)
def test_full_size_torchvision_models(name, size):
    model = tvm.get_model(name)
    for m in model.modules():  # some heads are zero-initialized: the output would not depend on the pruning
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    gm, masked, out = prune_and_shrink(model, image(size))  # asserts shrunk == masked, fewer params, lint
    assert out.shape == masked.shape and sum(p.numel() for p in gm.parameters()) < sum(
        p.numel() for p in model.parameters()
    )
