"""TraceError names the node that drove control flow and the input behind it; sparsify passes concrete_args on."""

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx.errors import TraceError


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, double=None):
        if double:
            x = x * 2
        return self.lin(x)


class _SizeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.lin(x)


def test_flag_input_remedy_names_the_concrete_arg():
    with pytest.raises(TraceError, match=r"Node 'double'.*control flow.*input 'double'.*concrete_args=\{'double'"):
        sparsifx.trace(_Flagged())


def test_size_branch_remedy_names_node_and_input():
    with pytest.raises(TraceError, match=r"Node 'gt'.*computed from input 'x'.*leaf_modules"):
        sparsifx.trace(_SizeBranch())


def test_sparsify_passes_concrete_args_and_leaf_modules():
    model = _Flagged().eval()
    x = torch.randn(3, 4)
    gm = sparsifx.sparsify(
        model, {"stages": [{"pass": "magnitude", "sparsity": 0.5}]}, example_inputs=(x,), concrete_args={"double": True}
    )
    gm.graph.lint()
    assert any(n.target == "lin" for n in gm.graph.nodes)
    outer = nn.Sequential(_SizeBranch())
    gm = sparsifx.sparsify(
        outer, {"stages": [{"pass": "magnitude", "sparsity": 0.5}]}, example_inputs=(x,), leaf_modules=["0"]
    )
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0"]
