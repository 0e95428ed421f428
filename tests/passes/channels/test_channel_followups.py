"""Follow-ups of issue #12 (timm zoo): ``F.pad(value=1)`` is not zero at pruned channels, functional
``F.linear`` prunes like ``nn.Linear``, ``unbind`` keeps the channels of a timm attention's q/k/v, optional
non-tensor placeholders (``attn_mask=None``) do not block shrink, and a parameter cut along two dims gets its
recorded shape from the sliced tensor."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.pass_manager import run_model  # noqa: E402
from sparsifx.passes.channels import ChannelPrune, Shrink  # noqa: E402
from sparsifx.selection import LayerSelection  # noqa: E402
from sparsifx.testing import n_params, prune_and_shrink, randomize_constants
from sparsifx.tracing import record_shapes  # noqa: E402

EVERY_LAYER = LayerSelection(types=("Module",))  # traced-into layers are plain nn.Module holders in the graph
IMG = (torch.randn(2, 3, 8, 8),)
TOK = (torch.randn(2, 5, 16),)


class Padded(nn.Module):
    """conv -> pad -> conv -> conv: with ``value=1`` the pruned channels of ``a`` are 1 at the border, not 0."""

    def __init__(self, value: float, module: bool = False):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        self.bn2, self.c = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.value, self.pad = value, nn.ConstantPad2d(1, value) if module else None

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        h = self.pad(h) if self.pad is not None else F.pad(h, (1, 1, 1, 1), value=self.value)
        return self.c(torch.relu(self.bn2(self.b(h))))


@pytest.mark.parametrize("module", [False, True])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_padding_with_a_non_zero_value_is_probed_and_shrink_stays_exact(module, value):
    model = Padded(value, module)
    randomize_constants(model)
    before = n_params(model)
    gm, _, _ = prune_and_shrink(model, IMG)  # asserts shrunk == masked and fewer params
    assert n_params(gm) < before and gm.b.out_channels == 4
    if value:  # removing a's channels would drop the padded ones: kept for exactness
        assert gm.a.out_channels == 8
        assert any("b" in n for n in gm.meta["channel_report"]["kept_for_exactness"])
    else:
        assert gm.a.out_channels == 4


class TracedLinear(nn.Linear):
    """timm's ``Linear``: an ``nn.Linear`` subclass traced into ``F.linear`` with ``get_attr`` weights."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = TracedLinear(6, 12), TracedLinear(12, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.out(torch.relu(self.l2(torch.relu(self.l1(x)))))


def test_functional_linear_with_parameter_weights_prunes_rows_and_columns_exactly():
    gm, _, _ = prune_and_shrink(FunctionalLinear(), (torch.randn(4, 6),), selection=EVERY_LAYER)
    assert any(n.op == "call_function" and n.target is F.linear for n in gm.graph.nodes)
    assert gm.l1.weight.shape == (6, 6) and gm.l1.bias.shape == (6,)
    assert gm.l2.weight.shape == (5, 6) and gm.out.in_features == 5
    shapes = {n.target: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op == "get_attr"}
    assert shapes["l2.weight"] == (5, 6)  # cut along two dims: the recorded shape is the sliced tensor's


def test_timm_linear_is_traced_into_f_linear_and_pruned():
    pytest.importorskip("timm")
    from timm.layers import Linear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = Linear(8, 16), Linear(16, 16), Linear(16, 4)

        def forward(self, x):
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    gm, _, _ = prune_and_shrink(Net(), (torch.randn(2, 5, 8),), selection=EVERY_LAYER)
    assert gm.fc1.weight.shape == (8, 8) and gm.fc2.weight.shape == (8, 8) and gm.head.weight.shape == (4, 8)


class Attention(nn.Module):
    """timm's ``Attention``: qkv -> reshape -> permute -> unbind -> sdpa -> transpose -> reshape -> proj."""

    def __init__(self, dim: int = 16, heads: int = 2, explicit_scale: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.explicit = heads, dim // heads, explicit_scale
        self.inp, self.qkv, self.proj = nn.Linear(16, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, 16)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        kw = {"scale": self.head_dim**-0.5} if self.explicit else {}
        x = F.scaled_dot_product_attention(q, k, v, **kw)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def test_timm_style_attention_prunes_the_hidden_dim_per_head_through_unbind():
    torch.manual_seed(0)
    gm, _, _ = prune_and_shrink(Attention(), TOK)
    assert gm.qkv.out_features < 48 and gm.proj.in_features < 16 and gm.qkv.out_features == 3 * gm.proj.in_features
    assert gm.inp.out_features == 8  # the embedding itself is pruned too
    report = gm.meta.get("channel_outcome")
    assert report is None or not any(b["op"].startswith(".unbind") for b in report.to_dict()["blockers"])


def test_attention_without_an_explicit_scale_keeps_its_default_scale_when_shrunk():
    """``sdpa``'s default scale is ``1/sqrt(head_dim)``: shrink passes the original one explicitly."""
    torch.manual_seed(0)
    gm, _, _ = prune_and_shrink(Attention(explicit_scale=False), TOK)
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert gm.qkv.out_features == 24 and sdpa.kwargs["scale"] == pytest.approx(8**-0.5)


def test_timm_attention_prunes_exactly():
    pytest.importorskip("timm")
    from timm.layers import Attention as TimmAttention

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(16, 16), TimmAttention(16, num_heads=2), nn.Linear(16, 4)

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.attn(h))

    torch.manual_seed(0)
    gm, _, _ = prune_and_shrink(Net(), TOK)
    assert gm.attn.qkv.out_features == 24 and gm.attn.proj.in_features == 8


class OptionalArgs(nn.Module):
    """timm's blocks take ``attn_mask=None, is_causal=False``: placeholders without example inputs or shapes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        return self.b(torch.relu(self.a(x)))


def test_optional_non_tensor_placeholders_carry_no_channels_and_do_not_block_shrink():
    model = OptionalArgs().eval()
    gm = fx.GraphModule(model, fx.Tracer().trace(model))
    x = (torch.randn(3, 8),)
    assert sum(n.op == "placeholder" for n in gm.graph.nodes) == 3
    record_shapes(gm, x)
    gm.meta["example_inputs"] = x
    before = n_params(gm)
    ChannelPrune(ratio=0.5)(gm)
    masked = run_model(gm, x)
    assert Shrink()(gm).modified
    torch.testing.assert_close(run_model(gm, x), masked)
    assert n_params(gm) < before and gm.a.out_features == 6
