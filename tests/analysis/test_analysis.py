"""The analysis layer: one shapes implementation, one table of op cost rules, named analyses, meta keys."""

from __future__ import annotations

import torch
import torch.nn as nn

import sparsifx
from sparsifx import meta_keys
from sparsifx.accounting import layer_flops
from sparsifx.analysis import costs, shapes
from sparsifx.registry import ANALYSES, Registry, type_key, type_registry_lookup
from sparsifx.tracing import trace


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.up, self.fc = nn.Conv2d(3, 8, 3, groups=1), nn.ConvTranspose2d(8, 4, 2), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.up(self.conv(x)).mean((2, 3)))


def test_old_import_paths_are_the_one_implementation():
    import sparsifx.passes.analysis.shapes as old_pass
    import sparsifx.reporting as reporting
    import sparsifx.shape_prop as old_core
    import sparsifx.tracing as tracing

    assert tracing.record_shapes is shapes.record_shapes is old_pass.record_shapes
    assert old_core.HeavyOpsOnMeta is shapes.HeavyOpsOnMeta
    assert reporting.MAC_RULES is costs.COST_RULES


def test_report_and_training_accounting_count_with_the_same_rules():
    x = torch.randn(2, 3, 10, 10)
    model = Net().eval()
    rep = sparsifx.report(model, (x,))
    per_layer = {lf.name: lf.forward_flops for lf in layer_flops(model, (x,))}
    assert set(per_layer) == {"conv", "fc"}  # the training accounting charges Conv/Linear layers only
    assert per_layer["conv"] == 2 * rep.layer("conv").macs == 2 * 2 * 8 * 8 * 8 * 3 * 9
    assert per_layer["fc"] == 2 * rep.layer("fc").macs
    assert rep.layer("up").macs == 2 * 8 * 8 * 8 * 4 * 4  # transposed conv: input elements x out/groups x k
    from sparsifx.passes.training.flops import macs_rule

    assert macs_rule(nn.ConvTranspose2d(2, 2, 2)) is None and macs_rule(nn.ReLU()) is None
    assert macs_rule(nn.Linear(3, 4))(nn.Linear(3, 4), torch.zeros(2, 4)) == 2 * 4 * 3


def test_named_analyses_write_their_meta_keys():
    x = torch.randn(1, 3, 10, 10)
    gm = trace(Net().eval())
    assert not shapes.shapes_present(gm)
    ANALYSES.get("shapes")(gm, (x,))
    assert shapes.shapes_present(gm) and all(meta_keys.TENSOR_META in n.meta for n in gm.graph.nodes)
    ANALYSES.get("macs")(gm, None)
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert conv.meta[meta_keys.MACS][0] == 8 * 8 * 8 * 3 * 9
    from sparsifx.passes.channels import coupling  # registers the channel_coupling analysis

    assert ANALYSES.get("channel_coupling").run is coupling.channel_coupling
    ANALYSES.get("channel_coupling")(gm, None)
    assert ANALYSES.get("channel_coupling").present(gm)
    assert gm.meta[meta_keys.CHANNEL_ANALYSIS].groups


def test_one_key_style_and_one_mro_lookup():
    table: Registry[str] = Registry("test")
    table.register(nn.Conv2d, "conv")
    table.register("module:" + type_key(nn.Linear) + ".weight", "linear weight")
    assert type_key(nn.Conv2d) == "torch.nn.modules.conv.Conv2d" and nn.Conv2d in table
    assert table.get(nn.Conv2d) == table.get("torch.nn.modules.conv.Conv2d") == "conv"

    class MyConv(nn.Conv2d):
        pass

    assert type_registry_lookup(table, MyConv(1, 1, 1)) == "conv" == type_registry_lookup(table, MyConv)
    assert type_registry_lookup(table, nn.Linear, prefix="module:", suffix=".weight") == "linear weight"
    assert type_registry_lookup(table, nn.ReLU()) is None


def test_meta_keys_are_distinct_named_constants():
    assert len(set(meta_keys.ALL.values())) == len(meta_keys.ALL)
    assert meta_keys.CHANNEL_PLAN == "channel_plan" and meta_keys.TENSOR_META == "tensor_meta"
