"""Follow-ups of the timm zoo sweep (issue #12): a reshape to a shape computed in the graph (maxvit's
``x.reshape(x.shape[:-1] + (-1,))``) shrinks instead of failing, vector norms (convnextv2's GlobalResponseNorm
``x.norm(p=2, dim=(1, 2), keepdim=True)``) carry the channels they do not reduce, and a shrunk model whose class
token is a parameter view (cait, pit) still counts FLOPs under ``no_grad``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from sparsifx.passes.channels import ChannelPrune  # noqa: E402
from sparsifx.testing import n_params, prune_and_shrink
from sparsifx.tracing import trace  # noqa: E402

TOK = (torch.randn(2, 5, 16),)
IMG = (torch.randn(2, 3, 8, 8),)


def barriers(model: nn.Module, inputs: tuple) -> list[dict]:
    gm = trace(model.eval(), inputs)
    gm.meta["example_inputs"] = inputs
    ChannelPrune(ratio=0.5)(gm)
    return gm.meta["channel_plan"].analysis.barriers


# ------------------------------------------------------------------ reshape to a computed shape (maxvit)
class ComputedShape(nn.Module):
    """linear -> relu -> ``h.reshape(h.shape[:-1] + (last,))`` -> linear -> relu -> linear: ``last = -1`` is
    maxvit's ``restore_shape + (-1,)`` (inferred: follows the kept channels); a size there is a barrier."""

    def __init__(self, last: int = -1):
        super().__init__()
        self.last = last
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h.reshape(h.shape[:-1] + (self.last,))
        return self.c(torch.relu(self.b(h)))


def test_reshape_to_a_computed_shape_inferring_the_channel_dim_shrinks_exactly():
    torch.manual_seed(0)
    model = ComputedShape()
    before = n_params(model)
    gm, _, _ = prune_and_shrink(model, TOK)  # asserts shrunk == masked (assert_close) and fewer params
    assert gm.a.out_features == 16 and gm.b.in_features == 16 and gm.b.out_features == 16
    assert n_params(gm) < before
    reshape = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape")
    assert not isinstance(reshape.args[1], tuple)  # the computed shape is kept as it is: it says -1


def test_reshape_to_a_computed_shape_sizing_the_channel_dim_is_a_barrier():
    torch.manual_seed(0)
    model = ComputedShape(last=32)
    gm, _, _ = prune_and_shrink(model, TOK)
    assert gm.a.out_features == 32 and gm.b.in_features == 32  # kept whole: shrink cannot rewrite that size
    assert gm.b.out_features == 16 and gm.c.in_features == 16
    assert any(b["reason"].startswith("sizes the channel dim by a computed shape") for b in barriers(model, TOK))


def test_maxvit_partition_attention_shrinks_exactly():
    pytest.importorskip("timm")
    from timm.models.maxxvit import AttentionCl

    class Net(nn.Module):  # maxvit's window attention: channels last, ``reshape(restore_shape + (-1,))``
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(16, 16), AttentionCl(16, 16, dim_head=8), nn.Linear(16, 4)

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.attn(h))

    torch.manual_seed(0)
    gm, _, _ = prune_and_shrink(Net(), (torch.randn(2, 4, 4, 16),))
    assert gm.attn.qkv.out_features < 48 and gm.attn.proj.in_features < 16


# ------------------------------------------------------------------ vector norms (convnextv2's GRN)
NORMS = {
    "method": lambda h, dim, keep: h.norm(p=2, dim=dim, keepdim=keep),
    "torch.norm": lambda h, dim, keep: torch.norm(h, 2, dim, keep),
    "vector_norm": lambda h, dim, keep: torch.linalg.vector_norm(h, 2, dim=dim, keepdim=keep),
    "linalg.norm": lambda h, dim, keep: torch.linalg.norm(h, dim=dim, keepdim=keep),
}


class SpatialNorm(nn.Module):
    """conv -> relu -> ``h * norm(h over space)`` (a GRN without its mean over channels) -> conv -> conv."""

    def __init__(self, kind: str, dim=(2, 3), keep: bool = True):
        super().__init__()
        self.kind, self.dim, self.keep = kind, dim, keep
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = NORMS[self.kind](h, self.dim, self.keep)
        h = h * (g if self.keep else g[:, :, None, None])
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("kind", sorted(NORMS))
def test_norm_over_spatial_dims_keeps_the_channels_and_shrinks_exactly(kind, keep):
    torch.manual_seed(0)
    model = SpatialNorm(kind, keep=keep)
    gm, _, _ = prune_and_shrink(model, IMG)
    assert gm.a.out_channels == 4 and gm.b.in_channels == 4 and gm.b.out_channels == 4
    assert not any("norm" in b["op"] for b in barriers(model, IMG))


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_norm_across_channels_is_a_barrier(kind):
    """``h / ||h||`` over the channel dim: removing a channel changes every norm, so ``a`` is kept whole."""

    class Net(SpatialNorm):
        def forward(self, x):
            h = torch.relu(self.a(x))
            h = h / (NORMS[self.kind](h, 1, True) + 1e-6)
            return self.c(torch.relu(self.b(h)))

    torch.manual_seed(0)
    model = Net(kind)
    gm, _, _ = prune_and_shrink(model, IMG)
    assert gm.a.out_channels == 8 and gm.b.out_channels == 4
    assert any(b["reason"] == "reduces across channels" for b in barriers(model, IMG))


def test_timm_global_response_norm_norm_has_a_rule():
    """GRN's ``x.norm(dim=(1, 2))`` is per channel now; its ``x_g.mean(dim=-1)`` over the channels stays a
    barrier (shrink would change the mean's denominator), so the channels of ``fc1`` are still kept whole."""
    pytest.importorskip("timm")
    from timm.layers.grn import GlobalResponseNorm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.grn, self.fc2 = nn.Linear(16, 32), GlobalResponseNorm(32), nn.Linear(32, 16)

        def forward(self, x):
            return self.fc2(self.grn(torch.relu(self.fc1(x))))

    model = Net()
    inputs = (torch.randn(2, 4, 4, 16),)
    found = barriers(model, inputs)
    assert not any(b["op"] == "method .norm()" for b in found)
    assert any(b["op"] == "method .mean()" and b["reason"] == "reduces across channels" for b in found)


# ------------------------------------------------------------------ class token views (cait, pit)
class ClassToken(nn.Module):
    """cait's ``forward_cls``: ``cls_token.expand(B, -1, -1)`` goes into a block as a module argument. Under
    ``no_grad`` that view has ``requires_grad`` and no ``grad_fn``; torch's ``FlopCounterMode`` (its
    ``ModuleTracker``) asserts on such a module input, so the sweep counts the dense timm model with frozen
    parameters. The traced and shrunk model runs the block's ops inline and counts as it is."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x, cls):
            return cls + self.fc2(torch.relu(self.fc1(cls + x.mean(1, keepdim=True))))

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.block, self.head = self.Block(), nn.Linear(16, 4)

    def forward(self, x):
        cls = self.block(x, self.cls_token.expand(x.shape[0], -1, -1))
        return self.head(cls[:, 0])


def flops(model: nn.Module, inputs: tuple) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops()


def test_shrunk_model_with_a_class_token_view_counts_flops_under_no_grad():
    torch.manual_seed(0)
    model = ClassToken().eval()
    with pytest.raises(AssertionError, match="gradient function"):  # torch's limit, on the eager model
        flops(model, TOK)
    gm, _, _ = prune_and_shrink(model, TOK)
    assert gm.block.fc1.out_features == 16
    assert 0 < flops(gm, TOK)
