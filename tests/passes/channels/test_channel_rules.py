"""One tiny model per channel rule: prune 50%, shrink, shrunk == masked, layers really smaller."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.errors import RecipeError
from sparsifx.pass_manager import run_model
from sparsifx.passes.channels import CHANNEL_RULES, ChannelPrune, Shrink, analyze_channels
from sparsifx.testing import prune_and_shrink
from sparsifx.tracing import trace

X = (torch.randn(2, 3, 8, 8),)


def block(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


class Head(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class SharedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.shared, self.head = block(3, 16), block(16, 16), Head(16)

    def forward(self, x):
        a = self.stem(x)
        return self.head(self.shared(a) + self.shared(a * 0.5))


class Grouped(nn.Module):
    def __init__(self, groups: int, depthwise_mult: int = 1):
        super().__init__()
        self.stem = block(3, 16)
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=groups), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Conv2d(16, 16 * depthwise_mult, 3, padding=1, groups=16)
        self.head = Head(16 * depthwise_mult)

    def forward(self, x):
        return self.head(self.dw(self.grouped(self.stem(x))))


class CatOfCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = block(3, 8), block(3, 8), block(3, 8)
        self.mix, self.head = block(24 + 8, 16), Head(16)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        inner = torch.cat([a, b], 1)
        return self.head(self.mix(torch.cat([inner, c, a], dim=1)))


class SplitAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.tail, self.head = block(3, 16), block(8, 8), Head(12)

    def forward(self, x):
        p, q = torch.split(self.stem(x), [8, 8], dim=1)
        r, s = self.stem(x).chunk(2, dim=1)
        y = self.tail(p + q) + r * s
        return self.head(torch.cat([y[:, :4], y[:, 4:], y[:, 2:6]], 1))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.features, self.fc1, self.fc2 = block(3, 8), nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x):
        y = F.max_pool2d(self.features(x), 2)
        return self.fc2(F.relu(self.fc1(y.view(y.size(0), 8 * 4 * 4))))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2 = block(3, 16), nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.head = Head(16)

    def forward(self, x):
        y = self.stem(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * s)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right, self.after, self.head = block(3, 8), block(3, 8), block(8, 8), Head(16)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1)
        b, c, h, w = y.size()
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        p, q = y.chunk(2, dim=1)
        return self.head(torch.cat([p, self.after(q)], 1))


class Attention(nn.Module):
    """Heads split with reshape, q @ k^T, softmax, @ v, merged back (like torchvision MaxViT)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed, self.qkv, self.proj, self.fc = (
            nn.Linear(3, dim),
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, 5),
        )

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))  # (B, L, dim)
        b, n, d = t.shape
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        q = q.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1)
        o = torch.einsum("bhij,bhjd->bhid", att, v).transpose(1, 2).reshape(b, n, d)
        return self.fc(self.proj(o).mean(1))


class ConstantChannel(nn.Module):
    """Pruned channels of ``bn`` become sigmoid(0) = 0.5 at the 1x1 consumer: folded into its bias."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.conv, self.bn, self.out = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.Conv2d(16, 4, k, padding=k // 2),
        )

    def forward(self, x):
        return self.out(torch.sigmoid(self.bn(self.conv(x))))


def test_shared_weights_are_pruned_once():
    gm, _, _ = prune_and_shrink(randomize_bn(SharedWeights()), X)
    shared, stem = gm.get_submodule("shared.0"), gm.get_submodule("stem.0")
    assert shared.out_channels == 8 and shared.in_channels == stem.out_channels == 8


def test_grouped_conv_groups_2_and_4_stay_balanced():
    for groups in (2, 4):
        gm, _, _ = prune_and_shrink(randomize_bn(Grouped(groups)), X)
        conv = gm.get_submodule("grouped.0")
        assert conv.groups == groups and conv.out_channels == conv.in_channels == 8
        assert conv.weight.shape == (8, 8 // groups, 3, 3) and conv.bias.shape == (8,)


def test_conv_groups_prune_removes_whole_groups_and_keeps_their_width():
    for groups in (2, 4, 8):
        gm, _, _ = prune_and_shrink(randomize_bn(Grouped(groups)), X, conv_groups="prune")
        conv = gm.get_submodule("grouped.0")
        assert conv.groups == groups // 2 and conv.out_channels == conv.in_channels == 8
        assert conv.weight.shape == (8, 16 // groups, 3, 3) and conv.bias.shape == (8,)
        assert "whole conv groups" not in " ".join(gm.meta["report_notes"])


def test_conv_groups_prune_drops_the_least_important_groups():
    model = randomize_bn(Grouped(4))
    reference = torch.cat([model.grouped[0].weight[0:4], model.grouped[0].weight[12:16]]).clone()
    with torch.no_grad():  # channels 4..11 (conv groups 1 and 2) are the weakest in every layer
        for t in (
            model.stem[0].weight,
            model.stem[1].weight,
            model.grouped[0].weight,
            model.grouped[1].weight,
            model.dw.weight,
        ):
            t[4:12].mul_(1e-3)
        model.head.fc.weight[:, 4:12].mul_(1e-3)
    gm, _, _ = prune_and_shrink(model, X, conv_groups="prune")
    torch.testing.assert_close(gm.get_submodule("grouped.0").weight, reference)


def test_conv_groups_rejects_unknown_mode():
    with pytest.raises(RecipeError, match="conv_groups"):
        ChannelPrune(conv_groups="merge")


def test_depthwise_with_multiplier():
    gm, _, _ = prune_and_shrink(randomize_bn(Grouped(1, depthwise_mult=2)), X)
    assert gm.dw.groups == gm.dw.in_channels == 8 and gm.dw.out_channels == 16


def test_cat_of_cat():
    gm, _, _ = prune_and_shrink(randomize_bn(CatOfCat()), X)
    a, b, c = (gm.get_submodule(f"{n}.0").out_channels for n in "abc")
    assert gm.get_submodule("mix.0").in_channels == 2 * a + b + c < 32


def test_split_then_add_and_slices():
    gm, _, _ = prune_and_shrink(randomize_bn(SplitAdd()), X)
    assert gm.get_submodule("stem.0").out_channels < 16


def test_flatten_to_linear_expands_channel_blocks():
    gm, _, _ = prune_and_shrink(randomize_bn(FlattenLinear()), X)
    assert gm.fc1.in_features == gm.get_submodule("features.0").out_channels * 16 == 4 * 16
    assert gm.fc2.out_features == 5  # the model output is never pruned


def test_squeeze_excitation_gate_is_coupled():
    gm, _, _ = prune_and_shrink(randomize_bn(SqueezeExcite()), X)
    assert gm.fc2.out_channels == gm.get_submodule("stem.0").out_channels == 8 and gm.fc1.out_channels == 4


def test_channel_shuffle():
    gm, _, _ = prune_and_shrink(randomize_bn(Shuffle()), X)
    # the shuffle pairs left[j] with right[j]
    assert gm.get_submodule("left.0").out_channels == gm.get_submodule("right.0").out_channels
    assert gm.get_submodule("left.0").out_channels < 8


def test_attention_heads_prune_within_head_dims():
    model = Attention()
    gm, _, _ = prune_and_shrink(model, X)
    v = gm.proj.in_features  # v's head dims flow into proj; q and k keep the same dims
    qk = (gm.qkv.out_features - v) // 2
    assert gm.qkv.out_features < 48 and gm.qkv.out_features == 2 * qk + v
    assert qk % 4 == 0 and v % 4 == 0 and 0 < qk < 16 and 0 < v < 16  # the same dims kept in each of 4 heads


class MHA(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed, self.att, self.mlp, self.fc = (
            nn.Linear(3, 16),
            nn.MultiheadAttention(16, 4, batch_first=batch_first),
            nn.Linear(16, 32),
            nn.Linear(32, 5),
        )

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))
        t = t if self.batch_first else t.transpose(0, 1)
        a, _ = self.att(t, t, t, need_weights=False)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.fc(F.gelu(self.mlp(a)).mean(1))


def test_multihead_attention_prunes_within_head_dims():
    for batch_first in (True, False):
        gm, _, _ = prune_and_shrink(MHA(batch_first), X)
        assert not gm.meta["channel_barriers"]
        q, k, v = (gm.get_submodule(f"att.{p}_proj") for p in "qkv")
        assert q.out_features == k.out_features < 16 and q.out_features % 4 == 0  # same dims kept in every head
        assert gm.get_submodule("att.out_proj").in_features == v.out_features < 16
        assert gm.embed.out_features == q.in_features == k.in_features == v.in_features < 16


def test_multihead_attention_with_mask_is_a_declared_barrier():
    class Masked(MHA):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.zeros(64, 64))

        def forward(self, x):
            t = self.embed(x.flatten(2).transpose(1, 2))
            a, _ = self.att(t, t, t, attn_mask=self.mask, need_weights=False)
            return self.fc(F.gelu(self.mlp(a)).mean(1))

    gm, _, _ = prune_and_shrink(Masked(), X)
    assert any("MultiheadAttention" in b["reason"] for b in gm.meta["channel_barriers"])
    assert gm.mlp.out_features == 16


def test_non_zero_constant_channel_is_folded():
    gm, _, _ = prune_and_shrink(ConstantChannel(k=1), X)
    assert gm.meta["channel_report"]["folded"] == 8 and gm.out.in_channels == 8


def test_non_zero_constant_with_padding_is_kept_and_reported():
    gm = trace(ConstantChannel(k=3).eval(), X)
    assert ChannelPrune(ratio=0.5)(gm).modified
    masked = run_model(gm, X)
    result = Shrink()(gm)
    assert not result.modified  # zero padding makes the constant position-dependent: nothing is cut
    torch.testing.assert_close(run_model(gm, X), masked)
    report = gm.meta["channel_report"]
    assert report["folded"] == 0 and len(report["kept_for_exactness"]) == 8
    assert "constant 0.5" in report["kept_for_exactness"][0] and gm.out.in_channels == 16


def test_unknown_op_is_a_barrier():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = block(3, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    gm = trace(Odd(), X)
    analysis = analyze_channels(gm)
    assert [b["op"] for b in analysis.barriers] == ["function cumsum"]
    assert not analysis.prunable[analysis.unit[analysis.tracker.module_atoms["a.0"].numpy()]].any()


def test_rules_are_registered_per_op():
    for key in (
        "fn:torch.cat",
        "method:view",
        "module:torch.nn.modules.conv.Conv2d",
        "module:torch.nn.modules.batchnorm.BatchNorm2d",
        "fn:_operator.add",
    ):
        assert key in CHANNEL_RULES
