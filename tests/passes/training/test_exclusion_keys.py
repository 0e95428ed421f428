"""First/last-layer exclusion: one spelling (dense_first_layer / dense_last_layer); old spellings warn, same result."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx.errors import RecipeError
from sparsifx.passes.training.swat import SWAT
from sparsifx.selection import DEPRECATED_EXCLUSION_KEYS, renamed_exclusion_keys


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def _masks(stage: dict) -> dict[str, torch.Tensor]:
    gm = sparsifx.sparsify(mlp(), {"stages": [stage]})
    ctrl = sparsifx.passes.training.controller(gm)
    return {n: m.clone() for n, m in ctrl.masks().items()}


def _no_deprecation(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return fn()


@pytest.mark.parametrize("method", ["static", "set", "rigl", "gmp"])
@pytest.mark.parametrize("first, last", [(False, True), (True, False), (True, True)])
def test_dst_old_dense_first_last_warn_and_match_the_new_keys(method, first, last):
    base = {"pass": method, "sparsity": 0.5, "distribution": "uniform"}
    new = _no_deprecation(lambda: _masks({**base, "dense_first_layer": first, "dense_last_layer": last}))
    with pytest.warns(DeprecationWarning) as record:
        old = _masks({**base, "dense_first": first, "dense_last": last})
    text = " ".join(str(w.message) for w in record)
    assert "'dense_first' is deprecated; use 'dense_first_layer'" in text
    assert "'dense_last' is deprecated; use 'dense_last_layer'" in text
    assert old.keys() == new.keys() and all(torch.equal(old[n], new[n]) for n in new)
    dense = ({"0"} if first else set()) | ({"4"} if last else set())
    assert not dense & set(new) and set(new) == {"0", "2", "4"} - dense  # dense layers are not controlled


@pytest.mark.parametrize("sparsify_first, sparsify_last", [(True, True), (False, False), (True, False)])
def test_swat_old_sparsify_first_last_warn_and_match_the_negated_new_keys(sparsify_first, sparsify_last):
    gm = sparsifx.trace(mlp())
    new = _no_deprecation(
        lambda: SWAT(dense_first_layer=not sparsify_first, dense_last_layer=not sparsify_last).targets(gm)
    )
    with pytest.warns(DeprecationWarning) as record:
        old = SWAT(sparsify_first_layer=sparsify_first, sparsify_last_layer=sparsify_last).targets(gm)
    text = " ".join(str(w.message) for w in record)
    assert "'sparsify_first_layer' is deprecated; use 'dense_first_layer'" in text
    assert "'sparsify_last_layer' is deprecated; use 'dense_last_layer'" in text
    assert list(old) == list(new)
    assert ("0" in new) == sparsify_first and ("4" in new) == sparsify_last
    with pytest.warns(DeprecationWarning) as record:
        via_recipe = sparsifx.sparsify(
            mlp(),
            {
                "stages": [
                    {
                        "pass": "swat",
                        "sparsity": 0.5,
                        "sparsify_first_layer": sparsify_first,
                        "sparsify_last_layer": sparsify_last,
                    }
                ]
            },
        )
    assert len({str(w.message) for w in record}) == 2  # one message per old key (the recipe may build the pass twice)
    swat_layers = {n for n, m in via_recipe.named_modules() if type(m).__name__.startswith("SWAT")}
    assert swat_layers == set(new)


def test_swat_defaults_unchanged():
    gm = sparsifx.trace(mlp())
    swat = _no_deprecation(lambda: SWAT())
    assert (swat.dense_first_layer, swat.dense_last_layer) == (True, False)
    assert list(swat.targets(gm)) == ["2", "4"]  # the CIFAR SWAT-U config: first layer dense, last sparse


def test_old_and_new_key_together_is_an_error():
    with pytest.raises(RecipeError, match="give only dense_first_layer"):
        sparsifx.sparsify(mlp(), {"stages": [{"pass": "static", "dense_first": True, "dense_first_layer": True}]})
    with pytest.raises(RecipeError, match="give only dense_last_layer"):
        SWAT(dense_last_layer=True, sparsify_last_layer=False)


def test_renamed_exclusion_keys_maps_every_old_spelling():
    assert set(DEPRECATED_EXCLUSION_KEYS) == {
        "dense_first",
        "dense_last",
        "sparsify_first_layer",
        "sparsify_last_layer",
    }
    with pytest.warns(DeprecationWarning):
        out = renamed_exclusion_keys("p", {"dense_first": None, "sparsify_last_layer": True, "seed": 1})
    assert out == {"dense_first_layer": None, "dense_last_layer": False, "seed": 1}
    with pytest.raises(RecipeError, match="must be true or false"), pytest.warns(DeprecationWarning):
        renamed_exclusion_keys("p", {"sparsify_first_layer": "yes"})
