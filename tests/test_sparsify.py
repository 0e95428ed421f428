"""sparsify(): the user's model is never mutated; a bad recipe fails before the model is touched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from sparsifx import PassBase, PassResult, RecipeError, sparsify
from sparsifx.masking import is_masked
from sparsifx.registry import register_pass


@register_pass("test_sparsify_scale_all", replace=True)
class ScaleAll(PassBase):
    """An in-place pass that rewrites every parameter and buffer of the module it is given."""

    in_place = True

    def __init__(self, *, factor: float = 0.0):
        self.factor = factor

    def call(self, gm):
        with torch.no_grad():
            for t in list(gm.parameters()) + [b for b in gm.buffers() if b.is_floating_point()]:
                t.mul_(self.factor)
        return PassResult(gm, True)


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        model.training,
    )


def assert_untouched(model: nn.Module, snap) -> None:
    state, types, training = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in now.items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key  # bit-identical
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.training == training


RECIPE = {
    "stages": [
        {"pass": "magnitude", "sparsity": 0.8, "distribution": "erk"},
        {"pass": "fold_bn"},
        {"pass": "test_sparsify_scale_all", "factor": 0.0},
    ]
}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_user_model_bit_identical(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    snap = snapshot(model)
    params = [id(p) for p in model.parameters()]
    x = torch.randn(1, 3, 32, 32)
    gm = sparsify(model, RECIPE, example_inputs=x)
    assert_untouched(model, snap)
    assert [id(p) for p in model.parameters()] == params
    assert not any(is_masked(m) for m in model.modules())
    assert any(is_masked(m) for m in gm.modules())
    assert all(float(p.detach().abs().sum()) == 0.0 for p in gm.parameters())  # the in-place pass hit the copy
    assert [h.name for h in gm.meta["history"]] == ["magnitude", "fold_bn", "test_sparsify_scale_all"]


def test_train_mode_model_and_verify_leave_model_alone():
    model = torchvision.models.resnet18(weights=None).train()
    snap = snapshot(model)
    sparsify(model, {"stages": [{"pass": "fold_bn"}]}, example_inputs=(torch.randn(2, 3, 32, 32),), verify=True)
    assert_untouched(model, snap)


class Watched(nn.Module):
    """Counts forward calls (tracing calls forward too) and deep copies."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.forwards = 0
        self.copies = 0

    def forward(self, x):
        self.forwards += 1
        return self.fc(x)

    def __deepcopy__(self, memo):
        self.copies += 1
        new = Watched.__new__(Watched)
        memo[id(self)] = new
        new.__dict__ = copy.deepcopy(self.__dict__, memo)
        return new


@pytest.mark.parametrize(
    "recipe,path",
    [
        ({"stages": [{"pass": "magnitude", "sparsity": 0.5}, {"pass": "fold_bn"}, {"pass": "nope"}]}, "stages[2].pass"),
        ({"stages": [{"pass": "magnitude", "sparsity": 2.0}]}, "stages[0].sparsity"),
        ("stages: [{pass: magnitude, sparsity: [}", "<yaml>"),
    ],
)
def test_bad_recipe_raises_before_model_is_touched(recipe, path):
    model = Watched()
    with pytest.raises(RecipeError) as info:
        sparsify(model, recipe, example_inputs=(torch.randn(2, 4),))
    assert info.value.path == path
    assert model.forwards == 0 and model.copies == 0
    good = sparsify(model, {"stages": [{"pass": "magnitude", "sparsity": 0.5}]}, example_inputs=(torch.randn(2, 4),))
    assert model.copies == 1 and is_masked(good.fc) and not is_masked(model.fc)
