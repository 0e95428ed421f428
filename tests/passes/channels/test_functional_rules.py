"""Channel rules for functional ops (what tracing into timm-style layers gives): one tiny model per rule,
prune 50% + shrink, shrunk == masked (norm statistics randomised first), layers really smaller, lint; ops
that cannot be pruned exactly are barriers that say why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.passes.channels import analyze_channels
from sparsifx.selection import LayerSelection
from sparsifx.testing import prune_and_shrink
from sparsifx.tracing import trace

X = (torch.randn(2, 3, 8, 8),)
EVERY_LAYER = LayerSelection(types=("Module",))  # traced-into layers are plain nn.Module holders in the graph


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters: constants would hide a mis-sliced tensor."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean", "bias", "norm_bias"):
                if isinstance(getattr(m, name, None), torch.Tensor):
                    getattr(m, name).copy_(torch.randn(getattr(m, name).shape, generator=g) * 0.5)
            for name in ("running_var", "norm_weight", "gain", "slope"):
                if isinstance(getattr(m, name, None), torch.Tensor):
                    getattr(m, name).copy_(torch.rand(getattr(m, name).shape, generator=g) + 0.5)
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


def barriers(gm) -> list[str]:
    return [f"{b['op']}: {b['reason']}" for b in gm.meta["channel_barriers"]]


def tensor_shapes(gm) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


# ---- norms ---------------------------------------------------------------------------------------------


class BNAct(nn.BatchNorm2d):
    """Like timm's ``BatchNormAct2d``: an ``nn.BatchNorm2d`` subclass whose forward is functional."""

    def __init__(self, c: int, act=F.relu):
        super().__init__(c)
        self.act = act

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )
        return self.act(x)


class BNActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), BNAct(16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1), BNAct(16, F.hardswish)
        self.c3, self.n3 = nn.Conv2d(16, 16, 3, padding=1, groups=16), BNAct(16, F.silu)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.n1(self.c1(x))
        h = h + self.n2(self.c2(h))
        return self.fc(self.n3(self.c3(h)).mean((2, 3)))


def test_batch_norm_subclass_with_functional_forward_is_pruned_like_the_module():
    model = randomize(BNActNet())
    gm = trace(model.eval(), X)
    analysis = analyze_channels(gm)
    assert analysis.barriers == []
    roles = {(m.owner, m.tensor): m.role for m in analysis.members if m.owner == "n1"}
    assert roles == {
        ("n1", "weight"): "out",
        ("n1", "bias"): "out",
        ("n1", "running_mean"): "aux",
        ("n1", "running_var"): "aux",
    }
    gm, _, _ = prune_and_shrink(model, X)
    shapes = tensor_shapes(gm)
    assert shapes["c1.weight"][0] == shapes["n1.running_var"][0] == shapes["n2.weight"][0] == 8
    assert shapes["n3.running_mean"] == shapes["n3.bias"] == (8,) and shapes["fc.weight"] == (5, 8)


class FunctionalNorms(nn.Module):
    """``F.batch_norm`` with batch statistics and ``F.instance_norm`` / ``F.prelu`` with their own tensors."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)
        self.norm_weight, self.norm_bias = nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16))
        self.slope = nn.Parameter(torch.full((16,), 0.25))

    def forward(self, x):
        h = F.instance_norm(self.c1(x), weight=self.norm_weight, bias=self.norm_bias)
        h = F.prelu(h, self.slope)
        h = F.batch_norm(self.c2(h), None, None, training=True)  # batch statistics, no affine
        return self.c3(F.relu(h))


def test_functional_instance_norm_prelu_and_batch_statistics():
    gm, _, _ = prune_and_shrink(randomize(FunctionalNorms()), X)
    assert barriers(gm) == []
    shapes = tensor_shapes(gm)
    assert shapes["norm_weight"] == shapes["norm_bias"] == shapes["slope"] == (8,)
    assert shapes["c2.weight"] == (8, 8, 1, 1) and shapes["c3.weight"] == (4, 8, 1, 1)


class StatsFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 4, 1)

    def forward(self, x, mean):
        return self.c2(F.relu(F.batch_norm(self.c1(x), mean, torch.ones_like(mean))))


def test_batch_norm_statistics_the_analysis_cannot_slice_are_a_barrier():
    gm = trace(StatsFromInput().eval(), (X[0], torch.zeros(16)))
    analysis = analyze_channels(gm)
    reasons = {b["reason"] for b in analysis.barriers}
    assert reasons == {
        "its per-channel 'running_mean' is not a tensor the analysis can slice",
        "its per-channel 'running_var' is not a tensor the analysis can slice",
    }
    assert not analysis.prunable[analysis.unit[analysis.tracker.module_atoms["c1"].numpy()]].any()


class LayerNormFn(nn.Module):
    """``F.layer_norm`` over the last dim: of a ``(N, C, L)`` tensor (the length) or of ``(N, L, C)`` (channels)."""

    def __init__(self, over_channels: bool):
        super().__init__()
        self.over_channels = over_channels
        self.c1, self.c2 = nn.Conv1d(3, 16, 3, padding=1), nn.Conv1d(16, 4, 1)

    def forward(self, x):
        h = self.c1(x)
        if self.over_channels:
            h = F.layer_norm(h.transpose(1, 2), (16,)).transpose(1, 2)
        else:
            h = F.layer_norm(h, (h.shape[-1],))
        return self.c2(F.gelu(h))


def test_layer_norm_fn_prunes_channels_it_does_not_normalize():
    gm, _, _ = prune_and_shrink(LayerNormFn(over_channels=False), (torch.randn(2, 3, 10),))
    assert barriers(gm) == [] and tensor_shapes(gm)["c2.weight"] == (4, 8, 1)


@pytest.mark.parametrize(
    "model, reason",
    [
        (LayerNormFn(over_channels=True), "function layer_norm: layer_norm statistics span these channels"),
        (None, "function group_norm: GroupNorm statistics span the channels of a group"),
    ],
)
def test_norms_over_channels_are_barriers_with_their_cause(model, reason):
    if model is None:

        class GroupNormFn(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.c2, self.w = nn.Conv1d(3, 16, 3), nn.Conv1d(16, 4, 1), nn.Parameter(torch.ones(16))

            def forward(self, x):
                return self.c2(F.group_norm(self.c1(x), 4, self.w))

        model = GroupNormFn()
    x = (torch.randn(2, 3, 10),)
    gm, _, _ = prune_and_shrink(model, x, expect_smaller=False)
    assert len(barriers(gm)) == 1 and barriers(gm)[0].startswith(reason)


# ---- activations ---------------------------------------------------------------------------------------

ACTIVATIONS = {
    "relu_inplace": lambda h: F.relu(h, inplace=True),
    "relu_": F.relu_,
    "relu6_inplace": lambda h: F.relu6(h, True),
    "leaky_relu_": lambda h: F.leaky_relu_(h, 0.1),
    "elu_": F.elu_,
    "hardtanh_": F.hardtanh_,
    "selu": F.selu,
    "celu": F.celu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu_inplace": lambda h: F.silu(h, True),
    "hardswish_inplace": lambda h: F.hardswish(h, True),
    "hardsigmoid": F.hardsigmoid,
    "mish": F.mish,
    "softsign": F.softsign,
    "logsigmoid": F.logsigmoid,
    "threshold": lambda h: F.threshold(h, 0.1, 0.0),
    "softshrink": F.softshrink,
    "tanh_": torch.tanh_,
    "sigmoid_": torch.sigmoid_,
    "clamp_min": lambda h: torch.clamp_min(h, 0.0),
    "clip": lambda h: torch.clip(h, -1, 1),
    "method_relu": lambda h: h.relu(),
    "method_sigmoid": lambda h: h.sigmoid(),
    "method_relu_": lambda h: h.relu_(),
    "method_tanh_": lambda h: h.tanh_(),
    "method_clamp_min": lambda h: h.clamp_min(0.1),
    "swish_inplace": lambda h: h.mul_(h.sigmoid()),
    "hard_sigmoid_timm": lambda h: F.relu6(h + 3.0) / 6.0,
}


class Activated(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_functional_activations_keep_the_channels(name):
    gm, _, _ = prune_and_shrink(Activated(ACTIVATIONS[name]), X)
    assert barriers(gm) == [] and gm.c1.out_channels == gm.c2.in_channels == 8


# ---- ops shaped like another tensor, index selection ----------------------------------------------------


class ShapedLike(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c1, self.c2, self.se, self.c3 = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 16, 1),
            nn.Conv2d(16, 16, 1),
            nn.Conv2d(16, 4, 1),
        )

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.mode == "expand_as":  # squeeze-excitation with an explicit broadcast
            h = h * torch.sigmoid(self.se(h.mean((2, 3), keepdim=True))).expand_as(h)
        elif self.mode == "view_as":  # a residual through view_as: the two streams are coupled
            h = h + F.relu(self.c2(h)).flatten(1).view_as(h)
        elif self.mode == "reshape_as":
            h = self.c2(h).flatten(2).reshape_as(h)
        else:  # channels last reshaped into channels first: they do not line up
            h = self.c2(h).permute(0, 2, 3, 1).reshape_as(h)
        return self.c3(h)


@pytest.mark.parametrize("mode", ["expand_as", "view_as", "reshape_as"])
def test_ops_shaped_like_another_tensor_follow_its_channels(mode):
    gm, _, _ = prune_and_shrink(ShapedLike(mode), X)
    assert barriers(gm) == [] and gm.c3.in_channels == 8


def test_reshape_as_that_scrambles_the_channels_is_a_barrier():
    gm, _, _ = prune_and_shrink(ShapedLike("scrambled"), X, expect_smaller=False)  # the target's shape too
    assert barriers(gm) == ["method .reshape_as(): reshaped to a tensor whose channels do not line up with the input's"]
    assert gm.c1.out_channels == gm.c2.out_channels == gm.c3.in_channels == 16


class Indexed(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3 if mode.startswith("channel") else 16, 4, 1)
        self.register_buffer("rows", torch.tensor([0, 2, 5]))
        self.register_buffer("mask", torch.arange(64) % 3 == 0)

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.mode == "index_select":
            h = torch.index_select(h, 2, self.rows).index_select(3, self.rows)
        elif self.mode == "tensor_index":
            h = h[:, :, self.rows][..., [1, 3]]
        elif self.mode == "mask":
            h = h.flatten(2)[:, :, self.mask].unsqueeze(-1)
        elif self.mode == "int_and_tensor":  # an int and an index tensor (torch places the dims as numpy does not)
            h = h[0, :, self.rows].unsqueeze(0)
        elif self.mode == "channel_index_select":
            h = h.index_select(1, self.rows)
        else:  # channel_tensor_index
            h = h[:, self.rows]
        return self.c2(h)


@pytest.mark.parametrize("mode", ["index_select", "tensor_index", "mask", "int_and_tensor"])
def test_index_selection_on_other_dims_keeps_the_channels(mode):
    gm, _, _ = prune_and_shrink(Indexed(mode), X)
    assert barriers(gm) == [] and gm.c2.in_channels == 8


@pytest.mark.parametrize(
    "mode, op", [("channel_index_select", "method .index_select()"), ("channel_tensor_index", "function getitem")]
)
def test_index_selection_of_channels_is_a_barrier(mode, op):
    gm = trace(Indexed(mode).eval(), X)
    analysis = analyze_channels(gm)
    assert [(b["op"], b["reason"].split(" (")[0]) for b in analysis.barriers] in (
        [(op, "selects channels by index")],
        [(op, "picks channels by index")],
    )
    assert not analysis.prunable[analysis.unit[analysis.tracker.module_atoms["c1"].numpy()]].any()


# ---- functional convs, weight standardisation ----------------------------------------------------------


class StdConv(nn.Conv2d):
    """timm's ``StdConv2d`` / ``ScaledStdConv2d`` (with ``gain``): the weight is standardised per output channel."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1, scaled: bool = False):
        super().__init__(cin, cout, k, padding=k // 2, groups=groups)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1)) if scaled else None
        self.scale = (cin // groups * k * k) ** -0.5

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=None if self.gain is None else (self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self, scaled: bool):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), BNAct(16)
        self.dw = StdConv(16, 16, 3, groups=16, scaled=scaled)  # per-row statistics over the kernel only
        self.ws = StdConv(16, 16, 3, scaled=scaled)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = F.relu(self.dw(self.n1(self.c1(x))))
        return self.head(F.relu(self.ws(h)))


@pytest.mark.parametrize("scaled", [False, True])
def test_weight_standardisation_prunes_rows_and_keeps_input_channels(scaled):
    model = randomize(StdConvNet(scaled))
    gm, _, _ = prune_and_shrink(model, X, selection=EVERY_LAYER)
    assert barriers(gm) == [
        "function conv2d: standardised weight: its statistics span the input channels, so they are kept whole"
    ]
    shapes = tensor_shapes(gm)
    assert shapes["ws.weight"] == (8, 16, 3, 3) and shapes["head.weight"] == (4, 8, 1, 1)  # rows only
    assert shapes["c1.weight"][0] == shapes["dw.weight"][0] == 16  # held by ws's input channels
    if scaled:
        assert shapes["ws.gain"] == (8, 1, 1, 1)
    reshape = next(
        n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape" and n.args[0].target == "ws.weight"
    )
    assert reshape.args[2] == 8  # the baked out_channels constant was rewritten


def test_depthwise_standardised_conv_follows_its_input_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.dw, self.head = (
                nn.Conv2d(3, 16, 3, padding=1),
                StdConv(16, 16, 3, 16, True),
                nn.Conv2d(16, 4, 1),
            )

        def forward(self, x):
            return self.head(F.relu(self.dw(F.relu(self.c1(x)))))

    gm, _, _ = prune_and_shrink(randomize(Net()), X, selection=EVERY_LAYER)
    assert barriers(gm) == [] and tensor_shapes(gm)["dw.weight"] == (8, 1, 3, 3)
    conv = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.conv2d)
    assert conv.args[6] == 8  # groups renumbered


def test_default_selection_types_traced_into_convs_by_their_recorded_class():
    """In the traced graph a traced-into conv is a plain ``nn.Module`` holder; ``gm.meta["module_classes"]``
    says it was a ``Conv2d`` subclass, so the default channel selection prunes it like ``types: [Module]``."""
    gm, _, _ = prune_and_shrink(randomize(StdConvNet(True)), X)
    assert tensor_shapes(gm)["ws.weight"] == (8, 16, 3, 3)


def test_pruning_input_channels_of_a_standardised_weight_would_not_be_exact():
    torch.manual_seed(0)
    conv, x = StdConv(8, 4, 3).eval(), torch.randn(1, 8, 6, 6)
    x[:, :4] = 0  # pruned input channels are zero...
    small = StdConv(4, 4, 3).eval()
    with torch.no_grad():
        small.weight.copy_(conv.weight[:, 4:])
        small.bias.copy_(conv.bias)
    assert not torch.allclose(small(x[:, 4:]), conv(x), atol=1e-3)  # ...but they moved the statistics


class FnConv(nn.Module):
    """A conv held as raw parameters and called functionally (both weight dims are sliced)."""

    def __init__(self, cin: int, cout: int, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.groups = groups

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, 1, 1, 1, self.groups)


class SameConv(nn.Conv2d):
    """Like timm's ``Conv2dSame`` traced into: pads, then ``F.conv2d`` with its own weight."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_functional_conv_with_parameter_weight_slices_both_dims():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.f, self.dw, self.s = FnConv(3, 16), FnConv(16, 16), FnConv(16, 16, 16), SameConv(16, 16, 3)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            h = F.relu(self.f(F.relu(self.c1(x))))
            return self.head(F.relu(self.s(F.relu(self.dw(h)))))

    gm, _, _ = prune_and_shrink(Net(), X, selection=EVERY_LAYER)
    assert barriers(gm) == []
    shapes = tensor_shapes(gm)
    assert shapes["c1.weight"] == (8, 3, 3, 3) and shapes["f.weight"] == (8, 8, 3, 3)
    assert shapes["dw.weight"] == (8, 1, 3, 3) and shapes["s.weight"] == (8, 8, 3, 3)


class PadFromShape(nn.Conv2d):
    """Reads its weight twice: as the conv weight and for its kernel size."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, 1, self.weight.shape[-1] // 2)


def test_weight_also_read_by_other_ops_keeps_its_input_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.p, self.head = nn.Conv2d(3, 16, 3, padding=1), PadFromShape(16, 16, 3), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(F.relu(self.p(F.relu(self.c1(x)))))

    gm, _, _ = prune_and_shrink(Net(), X, selection=EVERY_LAYER)
    assert barriers(gm) == [
        "function conv2d: weight parameter also read by other ops: its input channels are kept whole"
    ]
    assert tensor_shapes(gm)["p.weight"] == (8, 16, 3, 3) and gm.c1.out_channels == 16  # rows only


# ---- timm itself (optional) ------------------------------------------------------------------------------


def test_timm_layers_batch_norm_act_and_standardised_convs():
    layers = pytest.importorskip("timm.layers")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), layers.BatchNormAct2d(16, act_layer=nn.SiLU)
            self.ws = layers.ScaledStdConv2d(16, 16, 3, padding=1)
            self.same = layers.StdConv2dSame(16, 16, 3, stride=2)  # dynamic padding: an opaque leaf
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            h = F.relu(self.ws(self.n1(self.c1(x))))
            return self.head(F.relu(self.same(h)))

    gm, _, _ = prune_and_shrink(randomize(Net()), X, selection=EVERY_LAYER)
    assert gm.meta["opaque_leaves"] == ["same"]
    assert sorted(barriers(gm)) == [
        "function conv2d: standardised weight: its statistics span the input channels, so they are kept whole",
        "module same: standardised weight: its statistics span the input channels, so they are kept whole",
    ]
    shapes = tensor_shapes(gm)
    assert shapes["ws.weight"] == (16, 16, 3, 3) and shapes["same.weight"] == (8, 16, 3, 3)
    assert shapes["n1.running_mean"] == (16,) and gm.same.out_channels == 8
