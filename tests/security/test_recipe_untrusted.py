"""Recipes are untrusted input (issue #11): YAML alias bombs, size and depth caps, malformed values and selections
that match nothing all end in a typed error with the key path, quickly and in bounded memory."""

from __future__ import annotations

import logging
import resource
import time
import tracemalloc

import numpy as np
import pytest

from sparsifx import Recipe, RecipeError, SparsifxError, sparsify
from sparsifx.masking import is_masked
from sparsifx.passes.magnitude import MagnitudePruning
from sparsifx.recipe_input import LIMITS
from sparsifx.selection import SelectionError

MAG = {"pass": "magnitude", "sparsity": 0.5}


def billion_laughs() -> str:
    """The classic: 10 levels of 9 aliases each, 9**10 ~ 3.5e9 strings once expanded, in ~700 bytes."""
    lines = ["lol0: &lol0 [" + ",".join(["lol"] * 9) + "]"]
    for i in range(1, 10):
        lines.append(f"lol{i}: &lol{i} [" + ",".join([f"*lol{i - 1}"] * 9) + "]")
    lines.append("stages: [{pass: magnitude, sparsity: *lol9}]")
    return "\n".join(lines) + "\n"


def refuse_bounded(source, path: str | None = "<yaml>", match: str | None = None) -> RecipeError:
    """``Recipe.load(source)`` raises ``RecipeError`` (at ``path`` unless None) in < 1 s and < 50 MB of new memory."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the process's peak so far
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(RecipeError, match=match) as info:
            Recipe.load(source)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert elapsed < 1.0, elapsed
    assert peak < 50 * 2**20, peak
    assert grown < 50 * 2**10, f"peak RSS grew by {grown} KiB"
    assert path is None or info.value.path == path, str(info.value)
    return info.value


def test_billion_laughs_refused_fast_and_bounded(tmp_path):
    bomb = billion_laughs()
    assert len(bomb) < 1024
    err = refuse_bounded(bomb, match="anchor")
    assert "not allowed" in err.reason
    file = tmp_path / "bomb.yaml"
    file.write_text(bomb)
    refuse_bounded(file, match="anchor")
    refuse_bounded(str(file), match="anchor")


@pytest.mark.parametrize(
    "text,match",
    [
        ("stages: [{pass: magnitude, sparsity: *nope}]", "alias"),  # alias without anchor
        ("a: &x 0.5\nstages: [{pass: magnitude}]\n", "anchor"),  # an anchor alone
        ("stages: &s [{pass: magnitude}]\n", "anchor"),
        ("stages: [{pass: magnitude, <<: *base}]\n", "alias"),  # merge key through an alias
    ],
)
def test_anchors_and_aliases_refused(text, match):
    assert refuse_bounded(text, match=match).path == "<yaml>"


def test_text_and_file_size_capped(tmp_path):
    big = "stages: [{pass: magnitude}]\n#" + "x" * LIMITS.max_text_bytes
    err = refuse_bounded(big, match="too large")
    assert str(LIMITS.max_text_bytes) in err.reason
    file = tmp_path / "big.yaml"
    with open(file, "w") as f:  # sparse file: 4 GiB on paper, measured before it is read
        f.truncate(4 * 2**30)
    refuse_bounded(file, "<file>", match="too large")


@pytest.mark.parametrize(
    "text,match",
    [
        ("stages: " + "[" * 200 + "]" * 200, "nested too deeply"),
        ("stages:\n" + "".join(f"{'  ' * i}- \n" for i in range(60)), "nested too deeply"),
        ("stages: [" + ", ".join(["1"] * (LIMITS.max_nodes + 5)) + "]", "too large"),
        ("stages: [{pass: magnitude, distribution: " + "e" * (LIMITS.max_string + 1) + "}]", "too long"),
    ],
)
def test_yaml_depth_nodes_and_string_caps(text, match):
    assert refuse_bounded(text, match=match).path == "<yaml>"


@pytest.mark.parametrize(
    "text,path",
    [
        ("stages: [{pass: static, seed: 0x" + "f" * 2000 + "}]", "stages[0].seed"),  # huge integer
        ("stages: [{pass: magnitude, sparsity: .inf}]", "stages[0].sparsity"),
        ("stages: [{pass: magnitude, sparsity: .nan}]", "stages[0].sparsity"),
        ("stages: [{pass: magnitude, sparsity: 2024-01-01}]", "stages[0].sparsity"),  # a date
        ("stages: [{pass: magnitude, sparsity: !!binary aGVsbG8=}]", "stages[0].sparsity"),
        ("stages: [{pass: magnitude, 1: 2}]", "stages[0]"),  # non-string key
        ("stages: [{pass: static, seed: " + "9" * 5000 + "}]", "<yaml>"),  # beyond int() digit limit
        ("stages: [{pass: magnitude, sparsity: !!python/object/apply:os.system [echo]}]", "<yaml>"),
        ("stages: [{pass: magnitude, ? [1, 2] : 3}]", "<yaml>"),  # unhashable key
        ("stages: [{pass: magnitude, sparsity: !!timestamp r}]", "<yaml>"),  # AttributeError in PyYAML (fuzzing)
        ("stages: [{pass: magnitude, sparsity: !!float x}]", "<yaml>"),
        ("\x00", "<yaml>"),
    ],
)
def test_yaml_malformed_values(text, path):
    assert refuse_bounded(text, path).path == path


def deep(levels: int):
    value = 0.5
    for _ in range(levels):
        value = [value]
    return value


def cyclic_dict():
    stage = {"pass": "magnitude"}
    stage["by_name"] = {"fc": stage}
    return {"stages": [stage]}


def cyclic_list():
    stages = [MAG]
    stages.append(stages)
    return {"stages": stages}


def shared_bomb():
    """A DAG in Python: 10 levels of 10 references to the same list (1e10 leaves when walked naively)."""
    value = ["lol"] * 10
    for _ in range(10):
        value = [value] * 10
    return {"stages": [{**MAG, "ignore": value}]}


@pytest.mark.parametrize(
    "make,path,match",
    [
        (
            lambda: {"stages": [{**MAG, "sparsity": deep(100_000)}]},
            "stages[0].sparsity" + "[0]" * 29,
            "nested too deeply",
        ),
        (cyclic_dict, "stages[0].by_name.fc", "recursive"),
        (cyclic_list, "stages[1]", "recursive"),
        (shared_bomb, "stages[0].ignore", "too large"),
        (lambda: {"stages": [MAG] * (LIMITS.max_nodes + 1)}, "stages", "too large"),
        (lambda: {"stages": [MAG], "description": "x" * (LIMITS.max_string + 1)}, "description", "too long"),
        (lambda: {"stages": [{**MAG, "ignore": ["x" * 8000] * 200}]}, "stages[0].ignore", "characters of text"),
    ],
)
def test_dict_caps(make, path, match):
    err = refuse_bounded(make(), None, match=match)
    assert err.path.startswith(path), err.path


class Odd:
    pass


MALFORMED = [  # (stage or recipe, key path): each class of malformed value
    ({"stages": [{**MAG, "sparsity": 10**10000}]}, "stages[0].sparsity"),  # huge integers
    ({"stages": [{"pass": "static", "seed": 2**64}]}, "stages[0].seed"),
    ({"stages": [{"pass": "nm", "m": -(10**400)}]}, "stages[0].m"),
    ({"name": 10**5000, "stages": [MAG]}, "name"),
    ({"stages": [{**MAG, "sparsity": float("inf")}]}, "stages[0].sparsity"),  # non-finite floats
    ({"stages": [{**MAG, "sparsity": float("nan")}]}, "stages[0].sparsity"),
    ({"stages": [{"pass": "lower", "min_speedup": float("-inf")}]}, "stages[0].min_speedup"),
    ({"stages": [{**MAG, 1: 2}]}, "stages[0]"),  # non-string keys
    ({"stages": [{**MAG, (1, 2): 2}]}, "stages[0]"),
    ({"stages": [{**MAG, "by_name": {"fc": {1: 0.5}}}]}, "stages[0].by_name.fc"),
    ({("stages",): [MAG]}, ""),
    ({"stages": [{**MAG, "sparsity": [0.5]}]}, "stages[0].sparsity"),  # container for scalar
    ({"stages": [{**MAG, "distribution": {"erk": 1}}]}, "stages[0].distribution"),
    ({"stages": [{"pass": "lower", "cache_dir": []}]}, "stages[0].cache_dir"),
    ({"stages": [{"pass": "lower", "cache_dir": {}}]}, "stages[0].cache_dir"),
    ({"stages": [{"pass": "static", "seed": True}]}, "stages[0].seed"),  # bools for ints
    ({"stages": [{"pass": "nm", "m": False}]}, "stages[0].m"),
    ({"stages": [{"pass": "rigl", "delta_t": True}]}, "stages[0].delta_t"),
    ({"stages": [{"pass": "shrink", "seed": "abc"}]}, "stages[0].seed"),  # constructor unchecked
    ({"stages": [{"pass": "shrink", "seed": 1.5}]}, "stages[0].seed"),
    ({"stages": [{"pass": "channel_prune", "loss_fn": "abc"}]}, "stages[0].loss_fn"),
    ({"stages": [{**MAG, "selection": {"types": ["Linear"]}}]}, "stages[0].selection"),
    ({"stages": [{**MAG, "distribution": "e" * 10**6}]}, "stages[0].distribution"),  # absurd strings
    ({"stages": [{**MAG, "by_name": {"x" * 10**5: {"sparsity": 0.1}}}]}, "stages[0].by_name"),
    ({"stages": [{**MAG, "sparsity": b"0.5"}]}, "stages[0].sparsity"),  # not plain data
    ({"stages": [{**MAG, "ignore": {"fc"}}]}, "stages[0].ignore"),
    ({"stages": [{**MAG, "sparsity": Odd()}]}, "stages[0].sparsity"),
    ({"stages": [{**MAG, "types": ["Conv 2d"]}]}, "stages[0].types[0]"),  # not a class name
    ({"stages": [{**MAG, "by_type": {"*": {"sparsity": 0.1}}}]}, "stages[0].by_type.*"),
    ({"stages": [{**MAG, "allow_empty": "yes"}]}, "stages[0].allow_empty"),
    ({"stages": [{"pass": "fold_bn", "allow_empty": True}]}, "stages[0].allow_empty"),
]


@pytest.mark.parametrize("data,path", MALFORMED, ids=[f"{i}:{p or '<root>'}" for i, (_, p) in enumerate(MALFORMED)])
def test_malformed_value_is_recipe_error_at_key_path(data, path):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    assert info.value.path == path, str(info.value)
    assert len(str(info.value)) < 1000  # huge values are summarised, not printed


def test_from_params_direct_gets_the_same_checks():
    for params, path in [
        ({"sparsity": 10**10000}, "sparsity"),
        ({"sparsity": float("nan")}, "sparsity"),
        ({1: 2}, ""),
        ({"erk_power_scale": 2**2000}, "erk_power_scale"),
    ]:
        with pytest.raises(RecipeError) as info:
            MagnitudePruning.from_params(params)
        assert info.value.path == path and len(str(info.value)) < 1000


def test_numpy_scalars_are_plain_numbers():
    recipe = Recipe.from_dict({"stages": [{"pass": "static", "sparsity": np.float64(0.5), "seed": np.int64(3)}]})
    assert recipe.stages[0].params == {"sparsity": 0.5, "seed": 3}
    assert type(recipe.stages[0].params["seed"]) is int


def test_load_of_other_objects():
    for source in (42, b"stages: []", None, 1.5):
        with pytest.raises(RecipeError):
            Recipe.load(source)
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml("missing\x00file.yaml")
    assert info.value.path == "<file>"


# --- selections that match nothing ----------------------------------------------------------------------------------
from test_recipe import Net  # noqa: E402  (the recipe tests' model: conv, fc_a, fc_b, out)

EMPTY = [  # (selection keys, error path, a word the message carries)
    ({"by_name": {"fc_bb": {"sparsity": 0.2}}}, "by_name.fc_bb", "fc_b"),  # typo: nearest names
    ({"ignore": ["*"]}, "ignore", "every layer"),
    ({"ignore": ["fc_c"]}, "ignore[0]", "fc_b"),
    ({"types": ["Conv2dd"]}, "types[0]", "Conv2d"),
    ({"by_type": {"Linnear": {"sparsity": 0.2}}}, "by_type.Linnear", "Linear"),
    ({"by_type": {"Conv1d": {"sparsity": 0.2}}}, "by_type.Conv1d", "no selected layer"),
    ({"by_pattern": {"fcc*": {"sparsity": 0.2}}}, "by_pattern.fcc*", "fc_"),
    ({"types": ["Linear"], "by_name": {"conv": {"sparsity": 0.2}}}, "by_name.conv", "does not select"),
]


@pytest.mark.parametrize("keys,path,word", EMPTY, ids=[p for _, p, _ in EMPTY])
@pytest.mark.parametrize("pass_name", ["magnitude", "rigl", "nm"])
def test_selection_matching_nothing_is_an_error(pass_name, keys, path, word):
    stage = {"pass": pass_name, **keys}
    if pass_name == "nm":  # nm takes n/m per layer, not sparsity
        stage = {k: ({t: {"n": 1} for t in v} if k.startswith("by_") else v) for k, v in stage.items()}
    with pytest.raises(SelectionError) as info:
        sparsify(Net(), {"stages": [stage]})
    assert isinstance(info.value, SparsifxError) and isinstance(info.value, RecipeError)
    assert info.value.path == f"stages[0].{path}" and word in str(info.value), str(info.value)


@pytest.mark.parametrize("keys,path,word", EMPTY, ids=[p for _, p, _ in EMPTY])
def test_allow_empty_downgrades_to_a_warning(keys, path, word, caplog):
    with caplog.at_level(logging.WARNING, logger="sparsifx.selection"):
        gm = sparsify(Net(), {"stages": [{**MAG, **keys, "allow_empty": True}]})
    assert any(path in r.getMessage() and "allow_empty" in r.getMessage() for r in caplog.records), caplog.text
    if keys == {"ignore": ["*"]}:
        assert gm.meta["history"][0].modified is False and not is_masked(gm.fc_a)


def test_allow_empty_round_trips():
    recipe = Recipe.from_dict({"stages": [{**MAG, "ignore": ["fc_a"], "allow_empty": True}]})
    assert recipe.stages[0].build().selection.allow_empty
    assert Recipe.from_dict(recipe.to_dict()) == recipe == Recipe.from_yaml(recipe.to_yaml())


def test_known_types_absent_from_the_model_only_warn(caplog):
    """A recipe may serve several models: ``types: [Conv1d]`` on a model without one selects nothing, quietly."""
    with caplog.at_level(logging.WARNING, logger="sparsifx.selection"):
        gm = sparsify(Net(), {"stages": [{**MAG, "types": ["Conv1d"]}]})
    assert gm.meta["history"][0].modified is False
    assert "Conv1d" in caplog.text


def test_matching_selections_still_work():
    gm = sparsify(
        Net(),
        {
            "stages": [
                {
                    **MAG,
                    "ignore": ["conv"],
                    "by_name": {"fc_b": {"sparsity": 0.25}},
                    "by_pattern": {"fc_*": {"sparsity": 0.5}},
                    "by_type": {"Linear": {}},
                }
            ]
        },
    )
    assert not is_masked(gm.conv) and int((gm.fc_b.mask == 0).sum()) == 400
