"""Layer-sparsity distributions against rigl sparse_utils test vectors
(docs/algorithms.md#layer-sparsity-distributions)."""

from __future__ import annotations

import math

import pytest

from sparsifx import RecipeError
from sparsifx.distributions import er_epsilon_density, layer_sparsities

LENET = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}
NUMEL = {n: math.prod(s) for n, s in LENET.items()}


@pytest.mark.parametrize(
    "target,expected",
    [
        (0.90, (0.9204, 0.7698, 0.0)),
        (0.95, (0.9615, 0.8887, 0.0815)),
        (0.98, (0.9846, 0.9555, 0.6326)),
    ],
)
def test_erk_lenet_vectors(target, expected):
    got = layer_sparsities(LENET, target, "erk")
    assert tuple(round(got[n], 4) for n in LENET) == expected
    nonzeros = sum((1 - got[n]) * NUMEL[n] for n in LENET)
    assert nonzeros == pytest.approx((1 - target) * sum(NUMEL.values()), rel=1e-12, abs=1e-6)


def _zeros(sparsities):
    return sum(round(s * NUMEL[n]) for n, s in sparsities.items())


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.98])
@pytest.mark.parametrize("kind", ["er", "erk"])
def test_budget_equals_uniform_and_ratio_rule(target, kind):
    got = layer_sparsities(LENET, target, kind)
    uniform = layer_sparsities(LENET, target, "uniform")
    assert abs(_zeros(got) - _zeros(uniform)) <= 2
    dims = (lambda s: s) if kind == "erk" else (lambda s: s[:2])
    score = {n: sum(dims(s)) / math.prod(dims(s)) for n, s in LENET.items()}
    free = [n for n in LENET if got[n] > 0]
    ratios = [(1 - got[n]) / score[n] for n in free]
    assert all(r == pytest.approx(ratios[0], rel=1e-12) for r in ratios)


def test_conv_erk_uses_all_dims_and_er_dims_0_1():
    shapes = {"conv": (64, 32, 3, 3), "fc": (10, 256)}
    erk, er = layer_sparsities(shapes, 0.9, "erk"), layer_sparsities(shapes, 0.9, "er")
    r_erk = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    r_er = {n: sum(s[:2]) / math.prod(s[:2]) for n, s in shapes.items()}
    assert (1 - erk["conv"]) / (1 - erk["fc"]) == pytest.approx(r_erk["conv"] / r_erk["fc"])
    assert (1 - er["conv"]) / (1 - er["fc"]) == pytest.approx(r_er["conv"] / r_er["fc"])


def test_power_scale_zero_is_uniform_and_custom_and_dense():
    assert layer_sparsities(LENET, 0.8, "erk", erk_power_scale=0.0) == pytest.approx(
        layer_sparsities(LENET, 0.8, "uniform")
    )
    got = layer_sparsities(LENET, 0.9, "erk", custom={"fc1": 0.5}, dense_layers=["fc3"])
    assert got["fc1"] == 0.5 and got["fc3"] == 0.0
    assert got["fc2"] == pytest.approx(
        1 - (NUMEL["fc2"] - math.floor(0.9 * NUMEL["fc2"]) - math.floor(0.9 * NUMEL["fc3"])) / NUMEL["fc2"]
    )


def test_errors_and_er_epsilon():
    with pytest.raises(RecipeError) as info:
        layer_sparsities(LENET, 1.0, "erk")
    assert info.value.path == "sparsity"
    with pytest.raises(RecipeError) as info:
        layer_sparsities(LENET, 0.5, "lognormal")
    assert info.value.path == "distribution"
    with pytest.raises(RecipeError) as info:
        layer_sparsities(LENET, 0.5, "erk", dense_layers=["fc9"])
    assert info.value.path == "dense_layers"
    assert er_epsilon_density((1000, 784), 13) == pytest.approx(13 * 1784 / 784000)
    assert round(er_epsilon_density((1000, 784), 13), 4) == 0.0296
    assert er_epsilon_density((10, 10), 20) == 1.0
