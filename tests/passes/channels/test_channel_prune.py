"""``channel_prune``: parameters, importance criteria, selection, masked-model invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from sparsifx.errors import RecipeError
from sparsifx.pass_manager import PassManager, run_model
from sparsifx.passes.channels import IMPORTANCE, ChannelPrune, analyze_channels
from sparsifx.recipe import Recipe
from sparsifx.tracing import trace

X = (torch.randn(2, 3, 32, 32),)


def small_resnet():
    torch.manual_seed(0)
    return trace(torchvision.models.resnet18(num_classes=10).eval(), X)


def test_ratio_zero_changes_nothing():
    gm = small_resnet()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result = ChannelPrune(ratio=0.0)(gm)
    assert result.modified is False
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_prune_zeroes_whole_units_and_records_plan():
    gm = small_resnet()
    result = ChannelPrune(ratio=0.5)(gm)
    assert result.modified is True
    plan = gm.meta["channel_plan"]
    a = plan.analysis
    assert plan.pruned.sum() == sum(len(g.units) - int(np.ceil(len(g.units) * 0.5)) for g in a.groups)
    w = gm.get_submodule("layer1.0.conv1").weight
    zero_rows = (w.flatten(1).abs().sum(1) == 0).sum().item()
    assert zero_rows == 32
    bn = gm.get_submodule("layer1.0.bn1")
    assert ((bn.weight == 0) & (bn.bias == 0)).sum().item() == 32
    assert gm.fc.weight.abs().sum(1).ne(0).all()  # the classifier's outputs are never pruned
    second = ChannelPrune(ratio=0.5)
    gm2 = small_resnet()
    second(gm2)
    assert torch.equal(gm2.get_submodule("layer1.0.conv1").weight, w)  # deterministic


@pytest.mark.parametrize("name", ["l1", "l2", "bn_scale", "random", "taylor"])
def test_every_importance_criterion_runs_and_differs_from_random(name):
    gm = small_resnet()
    gm.meta["example_inputs"] = X
    a = analyze_channels(gm)
    scores = IMPORTANCE.get(name)(gm, a, ChannelPrune(importance=name))
    assert scores.shape == a.prunable.shape and np.isfinite(scores).all()
    assert scores[a.prunable].std() > 0
    assert ChannelPrune(ratio=0.5, importance=name)(gm).modified


def test_taylor_uses_given_batch_and_loss():
    gm = small_resnet()
    calls = []

    def loss(out):
        calls.append(out.shape)
        return out[:, 0].sum()

    ChannelPrune(ratio=0.3, importance="taylor", batch=(torch.randn(4, 3, 32, 32),), loss_fn=loss)(gm)
    assert calls == [torch.Size([4, 10])]
    assert all(p.grad is None for p in gm.parameters())


def test_round_to_and_at_least_one_kept():
    gm = small_resnet()
    ChannelPrune(ratio=0.9, round_to=8)(gm)
    plan = gm.meta["channel_plan"]
    for g in plan.analysis.groups:
        kept = (~plan.pruned[g.units]).sum()
        assert kept >= 1 and (kept % 8 == 0 or kept == len(g.units))


def test_ignore_and_per_layer_ratio_via_recipe():
    recipe = Recipe.from_dict(
        {
            "stages": [
                {
                    "pass": "channel_prune",
                    "ratio": 0.5,
                    "ignore": ["layer1.*"],
                    "by_name": {"layer2.0.conv1": {"ratio": 0.25}},
                }
            ]
        }
    )
    gm = small_resnet()
    PassManager.from_recipe(recipe, example_inputs=X).run(gm)
    assert gm.get_submodule("layer1.0.conv1").weight.flatten(1).abs().sum(1).ne(0).all()
    zero = gm.get_submodule("layer2.0.conv1").weight.flatten(1).abs().sum(1).eq(0).sum().item()
    assert zero == 32  # 25% of 128


def test_bad_parameters_raise_recipe_errors():
    with pytest.raises(RecipeError, match="ratio"):
        ChannelPrune(ratio=1.0)
    with pytest.raises(RecipeError, match="importance"):
        ChannelPrune(importance="magic")
    with pytest.raises(RecipeError, match="round_to"):
        ChannelPrune(round_to=0)


def test_model_inputs_and_outputs_are_fixed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    gm = trace(model, X)
    a = analyze_channels(gm)
    assert a.prunable.sum() == 8 and len(a.groups) == 1
    out = run_model(gm, X)
    ChannelPrune(ratio=0.5)(gm)
    assert run_model(gm, X).shape == out.shape


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (48, 8, 1, 1), (20, 4, 5, 5), (12, 30)])
def test_norm_scores_equal_the_per_slice_norms(p, shape):
    """The one-read kernel sums give each output and input channel the same p-norm as reducing its slice."""
    from sparsifx.passes.channels.importance import norm_scores
    from sparsifx.passes.channels.tracker import Member

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    score = norm_scores(p)
    for dim in (0, 1):
        member = Member(owner="conv", tensor="weight", dim=dim, atoms=torch.arange(shape[dim]), role="out", node="c")
        other = tuple(d for d in range(w.dim()) if d != dim)
        expected = w.abs().pow(p).sum(other).pow(1 / p)
        torch.testing.assert_close(score(member, w), expected, rtol=1e-5, atol=1e-5)
