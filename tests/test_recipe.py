"""Recipes: malformed input -> RecipeError with the exact key path; loading forms; round trips; priority."""

from __future__ import annotations

import dataclasses

import pytest
import torch.nn as nn

from sparsifx import Recipe, RecipeError, sparsify
from sparsifx.masking import is_masked

MAG = {"pass": "magnitude", "sparsity": 0.5}
FOLD = {"pass": "fold_bn"}

MALFORMED = [
    ([MAG], ""),  # not a mapping
    ({}, "stages"),  # no stages
    ({"stages": []}, "stages"),  # empty
    ({"stages": "magnitude"}, "stages"),  # not a list
    ({"stagse": [MAG]}, "stagse"),  # unknown top-level key
    ({"name": 3, "stages": [MAG]}, "name"),
    ({"description": ["x"], "stages": [MAG]}, "description"),
    ({"stages": ["magnitude"]}, "stages[0]"),  # stage not a mapping
    ({"stages": [{"sparsity": 0.5}]}, "stages[0].pass"),  # no pass key
    ({"stages": [FOLD, FOLD, {"pass": "no_such_pass"}]}, "stages[2].pass"),
    ({"stages": [{"pass": 5}]}, "stages[0].pass"),
    ({"stages": [FOLD, {**MAG, "sparsity": 1.5}]}, "stages[1].sparsity"),
    ({"stages": [{**MAG, "sparsity": "high"}]}, "stages[0].sparsity"),
    ({"stages": [{**MAG, "sparsity": True}]}, "stages[0].sparsity"),
    ({"stages": [{**MAG, "distribution": "gaussian"}]}, "stages[0].distribution"),
    ({"stages": [{**MAG, "sparsty": 0.5}]}, "stages[0].sparsty"),  # unknown parameter
    ({"stages": [{**MAG, "erk_power_scale": -1}]}, "stages[0].erk_power_scale"),
    ({"stages": [{**MAG, "dense_first_layer": "yes"}]}, "stages[0].dense_first_layer"),
    ({"stages": [{**MAG, "by_name": {"fc": {"sparsity": 2}}}]}, "stages[0].by_name.fc.sparsity"),
    ({"stages": [{**MAG, "by_name": {"fc": {"distribution": "er"}}}]}, "stages[0].by_name.fc.distribution"),
    ({"stages": [{**MAG, "by_pattern": {"layer*": 0.5}}]}, "stages[0].by_pattern.layer*"),
    ({"stages": [{**MAG, "by_type": "Conv2d"}]}, "stages[0].by_type"),
    ({"stages": [{**MAG, "by_name": {1: {"sparsity": 0.1}}}]}, "stages[0].by_name"),
    ({"stages": [{**MAG, "types": 3}]}, "stages[0].types"),
    ({"stages": [{**MAG, "ignore": [1, 2]}]}, "stages[0].ignore"),
    ({"stages": [MAG, {**FOLD, "types": ["Conv2d"]}]}, "stages[1].types"),  # pass takes no selection
    ({"stages": [MAG, {**FOLD, "eps": 1e-5}]}, "stages[1].eps"),
]


@pytest.mark.parametrize("data,path", MALFORMED, ids=[p or "<root>" for _, p in MALFORMED])
def test_malformed_recipe_key_path(data, path):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: " if path else "")


def test_error_carries_value_and_allowed():
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"stages": [{**MAG, "distribution": "gaussian"}]})
    err = info.value
    assert err.value == "gaussian" and "uniform" in err.allowed and "erk" in err.allowed
    assert "gaussian" in str(err) and "allowed" in str(err)
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"stages": [{"pass": "no_such_pass"}]})
    assert "magnitude" in info.value.allowed and "fold_bn" in info.value.allowed


@pytest.mark.parametrize(
    "source,path",
    [
        ("stages:\n  - pass: magnitude\n    sparsity: [0.5\n", "<yaml>"),
        ("stages: [{pass: magnitude, sparsity: 0.5}]\n  bad: : indent", "<yaml>"),
        ("just a string", ""),
        ("- pass: magnitude\n- pass: fold_bn\n", ""),
        ("stages:\n  - pass: magnitude\n    sparsity: 1.0\n", "stages[0].sparsity"),
        ("does/not/exist.yaml", "<file>"),
    ],
)
def test_malformed_yaml(source, path):
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(source)
    assert info.value.path == path


def test_load_rejects_other_types():
    with pytest.raises(RecipeError) as info:
        Recipe.load(42)
    assert info.value.path == ""


GOOD = {
    "name": "demo",
    "description": "erk then fold",
    "stages": [
        {
            "pass": "magnitude",
            "sparsity": 0.8,
            "distribution": "erk",
            "ignore": ["fc"],
            "by_name": {"conv1": {"sparsity": 0.3}},
        },
        {"pass": "fold_bn"},
    ],
}
GOOD_YAML = """
name: demo
description: erk then fold
stages:
  - pass: magnitude
    sparsity: 0.8
    distribution: erk
    ignore: [fc]
    by_name: {conv1: {sparsity: 0.3}}
  - pass: fold_bn
"""


def test_yaml_file_string_and_dict_load_equal(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD_YAML)
    from_dict, from_string = Recipe.from_dict(GOOD), Recipe.from_yaml(GOOD_YAML)
    assert from_dict == from_string == Recipe.from_yaml(path) == Recipe.load(str(path)) == Recipe.load(GOOD)
    assert Recipe.load(from_dict) is from_dict
    assert [s.pass_name for s in from_dict.stages] == ["magnitude", "fold_bn"]
    assert from_dict.stages[0].params["by_name"] == {"conv1": {"sparsity": 0.3}}


def test_round_trips():
    recipe = Recipe.from_dict(GOOD)
    assert recipe.to_dict() == GOOD
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "other"  # frozen


def test_repo_recipes_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml"))
    assert files, "examples/recipes/ has no recipe"
    for f in files:
        assert Recipe.from_yaml(f).stages


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc_a, self.fc_b, self.out = nn.Linear(4, 40), nn.Linear(40, 40), nn.Linear(40, 50)

    def forward(self, x):
        return self.out(self.fc_b(self.fc_a(self.conv(x).mean((2, 3)))))


def test_selection_priority_global_type_pattern_name():
    recipe = {
        "stages": [
            {
                "pass": "magnitude",
                "sparsity": 0.1,
                "by_type": {"Linear": {"sparsity": 0.2}},
                "by_pattern": {"fc_*": {"sparsity": 0.3}},
                "by_name": {"fc_b": {"sparsity": 0.4}},
            }
        ]
    }
    gm = sparsify(Net(), recipe)
    want = {"conv": 0.1, "out": 0.2, "fc_a": 0.3, "fc_b": 0.4}  # global < type < pattern < exact name
    for name, s in want.items():
        m = gm.get_submodule(name)
        assert is_masked(m) and int((m.mask == 0).sum()) == round(s * m.weight.numel()), name


def test_later_pattern_wins_and_ignore_removes():
    recipe = {
        "stages": [
            {
                "pass": "magnitude",
                "sparsity": 0.1,
                "ignore": ["conv"],
                "by_pattern": {"fc_*": {"sparsity": 0.3}, "*_b": {"sparsity": 0.6}},
            }
        ]
    }
    gm = sparsify(Net(), recipe)
    assert not is_masked(gm.conv)
    assert int((gm.fc_b.mask == 0).sum()) == round(0.6 * gm.fc_b.weight.numel())
    assert int((gm.fc_a.mask == 0).sum()) == round(0.3 * gm.fc_a.weight.numel())
    assert int((gm.out.mask == 0).sum()) == round(0.1 * gm.out.weight.numel())
