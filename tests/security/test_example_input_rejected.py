"""Example inputs the model rejects raise ``ExampleInputError`` (a ``TraceError``) naming the inputs' shapes and
the node and module that rejected them, before any pass runs; the fast shape path (heavy ops on meta) does
not record shapes for inputs the real layers would refuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsifx import PassManager, SparsifxError, TraceError, sparsify
from sparsifx.errors import ExampleInputError
from sparsifx.tracing import record_shapes, trace

RECIPE = {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]}


class Block(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], 8, 36)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.block = Block()
        self.head = nn.Linear(36, 2)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.bn1(self.conv1(x)))))


@pytest.fixture
def no_pass_runs(monkeypatch):
    def refuse(self, gm):
        raise AssertionError("a pass ran on inputs the model rejects")

    monkeypatch.setattr(PassManager, "run", refuse)


@pytest.mark.parametrize(
    "x,shape,where,module,node",
    [
        (torch.randn(2, 4, 8, 8), "(2, 4, 8, 8) float32", "module 'conv1' (Conv2d", "conv1", "conv1"),  # channels
        (torch.randn(2, 3, 8, 8).double(), "(2, 3, 8, 8) float64", "module 'conv1' (Conv2d", "conv1", "conv1"),
        (torch.randn(2, 3, 2, 2), "(2, 3, 2, 2) float32", "module 'conv1' (Conv2d", "conv1", "conv1"),  # too small
        (
            torch.randn(2, 3, 9, 9),
            "(2, 3, 9, 9) float32",
            "node 'view' (call_method view) in module 'block'",
            "block",
            "view",
        ),
    ],
)
def test_rejected_example_input_names_shape_and_module(no_pass_runs, x, shape, where, module, node):
    model = Net().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExampleInputError) as info:
        sparsify(model, RECIPE, example_inputs=(x,))
    err = info.value
    assert isinstance(err, TraceError) and isinstance(err, SparsifxError)
    assert shape in str(err) and where in str(err), str(err)
    assert (err.inputs, err.module, err.node) == (f"[{shape}]", module, node)
    assert "ShapeProp error" not in str(err) and "meta=" not in str(err)  # torch's reason, not the wrapper
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_wrong_feature_count_for_a_linear_is_caught_on_the_fast_path(capfd):
    """``HeavyOpsOnMeta`` computes Linear/Conv shapes by formula; it must still refuse what the layer refuses."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    gm = trace(model)
    with pytest.raises(ExampleInputError, match=r"\(3, 6\) float32.*module '0' \(Linear, node '_0'\)"):
        record_shapes(gm, (torch.randn(3, 6),))
    assert capfd.readouterr().err == ""  # ShapeProp's traceback is not printed: the error carries it


def test_missing_example_input_names_the_placeholder(no_pass_runs):
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ExampleInputError, match="node 'y' \\(placeholder y\\)"):
        sparsify(Two(), {"stages": [{"pass": "magnitude", "sparsity": 0.5}]}, example_inputs=(torch.ones(2),))


def test_accepted_inputs_still_record_shapes():
    gm = trace(Net(), (torch.randn(2, 3, 8, 8),))
    assert tuple(gm.graph.find_nodes(op="call_module", target="head")[0].meta["tensor_meta"].shape) == (2, 8, 2)
