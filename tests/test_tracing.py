"""sparsifx.trace: torchvision models, opaque-leaf fallback, TraceError, no mutation, leaf modules."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx import TraceError


def _eval_out(module, *inputs):
    module.eval()
    with torch.no_grad():
        return module(*inputs)


def test_resnet18_traces_and_matches_eager():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    gm = sparsifx.trace(model, (x,))
    assert isinstance(gm, fx.GraphModule)
    gm.graph.lint()
    assert gm.meta["opaque_leaves"] == []
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    assert len(convs) == 20
    torch.testing.assert_close(_eval_out(gm, x), _eval_out(model, x), rtol=0, atol=0)
    # shapes recorded with example inputs
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    assert tuple(fc.meta["tensor_meta"].shape) == (2, 1000)
    assert tuple(convs[0].meta["tensor_meta"].shape) == (2, 64, 32, 32)


class DataDependent(nn.Module):
    """Branches on a tensor value: symbolic tracing cannot follow it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class WithBadSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.block = nn.Sequential(nn.ReLU(), DataDependent())
        self.post = nn.Linear(8, 4)

    def forward(self, x):
        return self.post(self.block(self.pre(x)))


def test_opaque_leaf_fallback_records_path_and_matches_eager():
    torch.manual_seed(0)
    model = WithBadSubmodule()
    gm = sparsifx.trace(model)
    assert gm.meta["opaque_leaves"] == ["block.1"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["pre", "block.0", "block.1", "post"]
    for sign in (1.0, -1.0):  # both branches of the data-dependent submodule
        x = sign * torch.rand(3, 8) + sign
        torch.testing.assert_close(_eval_out(gm, x), _eval_out(model, x))


class TopLevelControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.mean() > 0:  # data-dependent branch in the top-level forward
            y = y * 2
        return y


def test_untraceable_top_level_raises_trace_error_naming_construct():
    with pytest.raises(TraceError) as info:
        sparsifx.trace(TopLevelControlFlow())
    msg = str(info.value)
    assert "TopLevelControlFlow" in msg
    assert "top-level forward" in msg
    assert "control flow" in msg or "symbolically traced" in msg
    assert "leaf_modules" in msg  # what the user can do


def test_trace_rejects_non_module():
    with pytest.raises(TraceError, match="nn.Module"):
        sparsifx.trace(lambda x: x)


def test_user_model_not_mutated():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    gm = sparsifx.trace(model, (torch.randn(1, 3, 32, 32),))
    with torch.no_grad():
        gm.conv1.weight.zero_()
    assert model.training == training
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert gm.conv1.weight.data_ptr() != model.conv1.weight.data_ptr()


def test_leaf_modules_by_path_and_by_type():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    by_path = sparsifx.trace(model, leaf_modules=["layer1.0"])
    targets = {n.target for n in by_path.graph.nodes if n.op == "call_module"}
    assert "layer1.0" in targets and "layer1.0.conv1" not in targets and "layer1.1.conv1" in targets
    torch.testing.assert_close(_eval_out(by_path, x), _eval_out(model, x))

    block_type = type(model.layer1[0])
    by_type = sparsifx.trace(model, leaf_modules=[block_type])
    targets = [n.target for n in by_type.graph.nodes if n.op == "call_module"]
    assert [t for t in targets if t.startswith("layer")] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    torch.testing.assert_close(_eval_out(by_type, x), _eval_out(model, x))


def test_concrete_args():
    class Flag(nn.Module):
        def forward(self, x, double: bool):
            return x * 2 if double else x

    gm = sparsifx.trace(Flag(), concrete_args={"double": True})
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), x * 2)  # the branch was resolved at trace time; the flag is bound
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert sum(n.op == "call_function" for n in gm.graph.nodes if "mul" in str(n.target)) == 1
