"""Layers fx traced into (a Conv2d / Linear subclass calling F.conv2d / F.linear) are bare ``nn.Module``
containers in the graph; ``gm.meta["module_classes"]`` lets the default channel selection type them."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.module_classes import META_KEY, class_name, is_container
from sparsifx.passes.magnitude import MagnitudePruning
from sparsifx.selection import LayerSelection, SelectionError
from sparsifx.serialization import from_payload, to_payload
from sparsifx.testing import n_params, prune_and_shrink
from sparsifx.tracing import retrace, trace

X = (torch.randn(2, 3, 8, 8),)


class StdConv(nn.Conv2d):
    """Like timm's ``StdConv2d``: the weight is standardised per output channel, then ``F.conv2d``."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FnLinear(nn.Linear):
    """Like timm's ``Linear`` subclass: ``F.linear`` in its own forward."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.ws, self.b2 = StdConv(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = FnLinear(16, 32), FnLinear(32, 5)

    def forward(self, x):
        h = F.relu(self.b2(self.ws(F.relu(self.b1(self.c1(x))))))
        return self.fc2(F.relu(self.fc1(h.mean((2, 3)))))


def randomized() -> Net:
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model.eval()


def test_trace_records_the_class_of_traced_into_layers():
    gm = trace(randomized(), X)
    assert type(gm.ws) is nn.Module and is_container(gm, "ws", gm.ws)
    table = gm.meta[META_KEY]
    assert table["ws"][0].endswith("StdConv") and table["ws"][1:3] == ["StdConv", "Conv2d"]
    assert table["fc1"][1:3] == ["FnLinear", "Linear"] and table["c1"][1] == "Conv2d"
    assert class_name(gm, "ws", gm.ws) == "StdConv" and not is_container(gm, "c1", gm.c1)
    assert all(isinstance(s, str) for entry in table.values() for s in entry)
    again = retrace(gm)
    assert again.meta[META_KEY]["ws"] == table["ws"] and again.meta[META_KEY]["fc1"] == table["fc1"]
    loaded = from_payload(to_payload(gm))  # plain data: saved with the model
    assert loaded.meta[META_KEY] == table


def test_selection_by_type_name_matches_traced_into_layers():
    gm = trace(randomized(), X)
    channel = LayerSelection().with_defaults(("Conv2d", "Linear")).with_traced_into()
    assert [n for n, _ in channel.layers(gm)] == ["c1", "ws", "fc1", "fc2"]
    assert [n for n, _ in LayerSelection(types=("StdConv",)).with_traced_into().layers(gm)] == ["ws"]
    by_type = LayerSelection(by_type=(("FnLinear", (("ratio", 0.25),)),)).with_traced_into()
    assert by_type.param("fc1", gm.fc1, "ratio", 0.5, root=gm) == 0.25
    assert by_type.param("c1", gm.c1, "ratio", 0.5, root=gm) == 0.5
    plain = LayerSelection()  # passes that need the real class (magnitude) never see a container
    assert [n for n, _ in plain.layers(gm)] == ["c1"]
    with pytest.raises(SelectionError, match="by_name.ws"):
        LayerSelection(by_name=(("ws", (("ratio", 0.1),)),)).layers(gm)


def test_default_channel_prune_shrinks_traced_into_layers_exactly():
    model = randomized()
    before = n_params(model)
    gm, _, _ = prune_and_shrink(model, X, ratio=0.5)
    assert gm.ws.weight.shape == (8, 16, 3, 3)  # rows pruned; inputs held by the standardisation
    assert gm.fc1.weight.shape == (16, 8) and gm.fc2.weight.shape == (5, 16)  # F.linear: rows and columns
    assert n_params(gm) < before
    assert gm.meta[META_KEY]["ws"][1] == "StdConv"  # the record survives prune + shrink


def test_selected_container_without_functional_rule_is_left_whole_and_reported(caplog):
    class Weird(nn.Conv2d):  # reads its weight through an op no layer rule covers
        def forward(self, x):
            return F.conv_transpose2d(x, self.weight.transpose(0, 1).contiguous(), self.bias, padding=1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.odd, self.c2 = nn.Conv2d(3, 8, 3, padding=1), Weird(8, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c2(F.relu(self.odd(F.relu(self.c1(x)))))

    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="sparsifx.passes.channels.prune"):
        gm, _, _ = prune_and_shrink(M().eval(), X, ratio=0.5, expect_smaller=False)
    assert gm.odd.weight.shape == (8, 8, 3, 3)
    assert any("traced-into layers left whole" in n and "odd (Weird)" in n for n in gm.meta["report_notes"])
    assert "odd" in caplog.text


def test_magnitude_never_masks_a_container():
    gm = trace(randomized(), X)
    result = MagnitudePruning(sparsity=0.5)(gm)
    assert result.modified and type(gm.ws) is nn.Module and type(gm.fc1) is nn.Module
    assert float((gm.ws.weight == 0).float().mean()) == 0.0
