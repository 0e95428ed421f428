"""All-ReLU (docs/algorithms.md#all-relu): f(z) = z for z >= 0 else a_l·z, a_l alternating in sign over hidden
layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.errors import RecipeError
from sparsifx.passes.all_relu import AllReLU, AllReLUPass
from sparsifx.sparse_linear import SparseLinear


def mlp(dims=(20, 16, 16, 16, 4)) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


def reference(net: nn.Sequential, x: torch.Tensor, slopes) -> torch.Tensor:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for layer, a in zip(linears[:-1], slopes):
        z = layer(x)
        x = torch.where(z >= 0, z, a * z)
    return linears[-1](x)


@pytest.mark.parametrize("slope", [-0.6, 0.6, -0.75])
def test_values_and_derivatives_match_the_formula(slope):
    z = torch.tensor([-3.0, -0.5, -1e-4, 0.0, 1e-4, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    y = AllReLU(slope)(z)
    torch.testing.assert_close(y, torch.where(z >= 0, z, slope * z))
    (grad,) = torch.autograd.grad(y.sum(), z)
    expected = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))  # 1 for z > 0 else a_l
    torch.testing.assert_close(grad, expected)
    assert AllReLU(slope).slope == slope


def test_hidden_activations_alternate_in_sign_starting_negative():
    net = mlp()
    gm = sparsifx.trace(net)
    result = AllReLUPass(slope=0.6)(gm)
    assert result.modified and result.gm is gm
    gm.graph.lint()
    acts = [m for m in gm.modules() if isinstance(m, AllReLU)]
    assert [m.slope for m in acts] == [-0.6, 0.6, -0.6]
    assert not any(type(m) is nn.ReLU for m in gm.modules())
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3", "4", "5", "6"]
    x = torch.randn(5, 20)
    torch.testing.assert_close(gm(x), reference(net, x, [-0.6, 0.6, -0.6]))


class Functional(nn.Module):
    """A shared ReLU module and the functional forms: each call gets its own slope."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.a(x))
        x = F.relu(self.b(x))
        x = torch.relu(self.c(x)).relu()
        return self.d(self.act(x))


def test_functional_and_shared_relus_get_one_module_each():
    net = Functional()
    gm = sparsifx.trace(net)
    AllReLUPass(slopes=[-0.5, 0.25, -0.75, 1.0, 2.0])(gm)
    gm.graph.lint()
    called = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert [m.slope for m in called if isinstance(m, AllReLU)] == [-0.5, 0.25, -0.75, 1.0, 2.0]
    assert not hasattr(gm, "act")  # the shared ReLU is gone once no node calls it
    x = torch.randn(4, 6)

    def f(z, a):
        return torch.where(z >= 0, z, a * z)

    expected = net.d(f(f(f(net.c(f(net.b(f(net.a(x), -0.5)), 0.25)), -0.75), 1.0), 2.0))
    torch.testing.assert_close(gm(x), expected)


def test_recipe_stage_before_sparse_training():
    net = mlp((64, 48, 48, 10))
    gm = sparsifx.sparsify(
        net, {"stages": [{"pass": "all_relu", "slope": 0.6}, {"pass": "set", "storage": "sparse", "epsilon": 5}]}
    )
    gm.graph.lint()
    assert [type(gm.get_submodule(n)).__name__ for n in ("0", "1", "2", "3")] == [
        "SparseLinear",
        "AllReLU",
        "SparseLinear",
        "AllReLU",
    ]
    assert isinstance(gm.get_submodule("0"), SparseLinear)
    assert [gm.get_submodule(n).slope for n in ("1", "3")] == [-0.6, 0.6]
    assert gm(torch.randn(3, 64)).shape == (3, 10)


def test_save_and_load_keep_the_slopes(tmp_path):
    gm = sparsifx.sparsify(mlp(), {"stages": [{"pass": "all_relu", "slope": 0.75}]})
    sparsifx.save(gm, tmp_path / "m.sfx")
    loaded = sparsifx.load(tmp_path / "m.sfx")
    assert [m.slope for m in loaded.modules() if isinstance(m, AllReLU)] == [-0.75, 0.75, -0.75]
    x = torch.randn(3, 20)
    torch.testing.assert_close(loaded(x), gm(x))


def test_no_relu_is_not_modified():
    gm = sparsifx.trace(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)))
    assert not AllReLUPass()(gm).modified


@pytest.mark.parametrize(
    "params, path",
    [
        ({"slope": 0}, "stages[0].slope"),
        ({"slope": -0.6}, "stages[0].slope"),
        ({"slope": "0.6"}, "stages[0].slope"),
        ({"slope": float("nan")}, "stages[0].slope"),
        ({"slopes": []}, "stages[0].slopes"),
        ({"slopes": [0.6, "x"]}, "stages[0].slopes[1]"),
        ({"slopes": 0.6}, "stages[0].slopes"),
        ({"slop": 0.6}, "stages[0].slop"),
    ],
)
def test_bad_parameters_raise_recipe_errors_at_their_key(params, path):
    with pytest.raises(RecipeError) as info:
        sparsifx.Recipe.from_dict({"stages": [{"pass": "all_relu", **params}]})
    assert info.value.path == path


def test_slopes_must_match_the_number_of_relus():
    with pytest.raises(RecipeError) as info:
        sparsifx.sparsify(mlp(), {"stages": [{"pass": "all_relu", "slopes": [-0.6, 0.6]}]})
    assert info.value.path == "stages[0].slopes" and "3 ReLU" in str(info.value)
