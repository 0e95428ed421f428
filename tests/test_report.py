"""sparsifx.report: params, non-zeros, sparsity, MACs from shapes, table, to_dict, extra columns."""

import json

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.masking import set_mask
from sparsifx.reporting import MAC_RULES


def test_resnet18_counts_match_known_values():
    model = torchvision.models.resnet18()
    rep = sparsifx.report(model, (torch.randn(1, 3, 224, 224),))
    assert rep.total_params == 11_689_512 == sum(p.numel() for p in model.parameters())
    # the standard figure for resnet18 at 224 px: 1.82 GMACs (convs + fc + BN affine)
    assert rep.total_macs == pytest.approx(1.82e9, rel=0.01)
    assert rep.total_flops == 2 * rep.total_macs
    conv1 = rep.layer("conv1")
    assert conv1.type == "Conv2d" and conv1.params == 64 * 3 * 7 * 7
    assert conv1.macs == 64 * 112 * 112 * 3 * 7 * 7
    assert rep.layer("fc").macs == 512 * 1000
    assert rep.input_shapes == [[1, 3, 224, 224]]
    assert rep.sparsity == pytest.approx(1 - rep.total_nonzeros / rep.total_params)


def test_masked_layers_count_effective_nonzeros_and_sparse_macs():
    torch.manual_seed(0)
    gm = sparsifx.trace(torchvision.models.resnet18(), (torch.randn(2, 3, 32, 32),))
    mask = (torch.rand(1000, 512) > 0.75).float()
    set_mask(gm, "fc", mask)
    rep = sparsifx.report(gm)  # shapes already in node.meta from trace
    fc = rep.layer("fc")
    nz_weight = int(torch.count_nonzero(gm.fc.weight * mask))
    assert fc.type == "MaskedLinear"
    assert fc.params == 512 * 1000 + 1000
    assert fc.nonzeros == nz_weight + int(torch.count_nonzero(gm.fc.bias))
    assert fc.macs == 2 * 512 * 1000
    assert fc.sparse_macs == round(fc.macs * nz_weight / mask.numel())
    assert rep.total_sparse_macs < rep.total_macs
    assert rep.total_nonzeros == sum(r.nonzeros for r in rep.layers)


def test_attention_and_functional_rules():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.proj = nn.Parameter(torch.randn(16, 8))

        def forward(self, x):
            y, _ = self.attn(x, x, x, need_weights=False)
            return torch.matmul(y, self.proj) + torch.nn.functional.linear(y, self.proj.t()).sum()

    x = torch.randn(2, 5, 16)
    rep = sparsifx.report(Tiny(), (x,))
    tokens = 2 * 5
    assert rep.layer("attn").macs == 4 * tokens * 16 * 16 + 2 * tokens * 5 * 16
    root = rep.layer("(root)")  # the matmul and linear run in the top-level forward, on the root parameter
    assert root.macs == 2 * tokens * 16 * 8
    assert rep.total_macs == rep.layer("attn").macs + root.macs
    assert nn.MultiheadAttention in MAC_RULES and "matmul" in MAC_RULES


def test_without_shapes_flops_are_none_and_noted():
    rep = sparsifx.report(torchvision.models.mobilenet_v3_small())
    assert rep.total_macs is None and rep.total_flops is None
    assert all(r.macs is None for r in rep.layers)
    assert any("example_inputs" in n for n in rep.notes)
    assert rep.total_params == sum(p.numel() for p in torchvision.models.mobilenet_v3_small().parameters())


def test_shared_parameter_counted_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    rep = sparsifx.report(model, (torch.randn(3, 4),))
    assert rep.total_params == 20
    assert rep.layer("0").macs == 2 * 3 * 4 * 4  # both calls of the shared layer


def test_table_and_dict():
    gm = sparsifx.trace(torchvision.models.resnet18(), (torch.randn(1, 3, 32, 32),))
    gm.meta["report_extra"] = {"fc": {"backend": "csr", "speedup": 1.5}, "conv1": {"barriers": 2}}
    gm.meta["report_notes"] = ["a note from another pass"]
    rep = sparsifx.report(gm)
    text = str(rep)
    lines = text.splitlines()
    header = lines[1]
    for col in ("layer", "params", "nonzeros", "sparsity", "MACs", "FLOPs", "backend", "speedup", "barriers"):
        assert col in header
    assert any(line.startswith("total") for line in lines)
    assert lines[-1] == "note: a note from another pass"
    body = [line for line in lines[3:] if line.startswith(("conv1 ", "fc "))]
    assert len(body) == 2 and "csr" in body[1] and "1.5" in body[1]
    end = header.index("sparsity") + len("sparsity")  # right-aligned column: every value ends there
    rows = [line for line in lines[3:-1] if not line.startswith("-")]
    assert len(rows) > 40 and all(line.index("%") + 1 == end for line in rows)
    data = json.loads(json.dumps(rep.to_dict()))  # JSON-serialisable
    fc = next(layer for layer in data["layers"] if layer["name"] == "fc")
    assert fc["extra"] == {"backend": "csr", "speedup": 1.5}
    assert data["totals"]["params"] == rep.total_params
    assert data["notes"] == ["a note from another pass"]


def test_report_is_the_function_and_reporting_the_module():
    import importlib

    module = importlib.import_module("sparsifx.reporting")  # no submodule shadows the function any more
    model = nn.Linear(3, 2)
    assert sparsifx.report is module.report and sparsifx.report(model).total_params == 8


def test_untraceable_model_reports_params_and_notes_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else x

    rep = sparsifx.report(Branchy(), (torch.randn(2, 3),))
    assert rep.total_params == 12 and rep.total_macs is None
    assert any("no MACs/FLOPs" in n and "top-level forward" in n for n in rep.notes)
