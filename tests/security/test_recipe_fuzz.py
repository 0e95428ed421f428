"""Property-based fuzzing of recipes (issue #11): whatever dict or YAML text comes in, only a ``SparsifxError``
escapes ``Recipe.from_dict`` / ``Recipe.from_yaml`` / ``Recipe.load``, with a bounded message."""

from __future__ import annotations

import inspect

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsifx import Recipe, SparsifxError  # noqa: E402
from sparsifx.passes.training.dst_base import MaskConfig  # noqa: E402
from sparsifx.registry import PASSES  # noqa: E402
from sparsifx.selection import SELECTION_KEYS  # noqa: E402

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

PASS_NAMES = PASSES.names()


def recipe_keys(name: str) -> list[str]:
    """The keys a recipe stage of pass ``name`` may hold (its parameters, mask fields, selection keys)."""
    params = list(inspect.signature(PASSES.get(name).__init__).parameters)[1:]
    extra = (list(MaskConfig.FIELDS) if "mask" in params else []) + (
        list(SELECTION_KEYS) if "selection" in params else []
    )
    return sorted(set(params) - {"selection", "mask"} | set(extra))


PARAMS_OF = {name: recipe_keys(name) for name in PASS_NAMES}
PARAM_NAMES = sorted({p for keys in PARAMS_OF.values() for p in keys} | {"pass", "mask", "selection"})

huge_ints = st.builds(
    lambda sign, bits: sign * 2**bits,
    st.sampled_from([1, -1]),  # up to 10**10000
    st.sampled_from([63, 64, 65, 1024, 1100, 33220]),
)
words = st.sampled_from(
    PASS_NAMES
    + PARAM_NAMES
    + [
        "x" * 10_000,
        "*",
        "Conv2d",
        "Linear",
        "Conv2dd",
        "erk",
        "uniform",
        "auto",
        "csr",
        "fc",
        "layer1.*",
        "",
        "1e999",
        "null",
    ]
)
plain_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63) + 1, 2**63 - 1),
    st.integers(-3, 200),
    st.floats(-1e6, 1e6),
    st.floats(0, 1),
    st.text(max_size=20),
    words,
)
nasty_scalars = st.one_of(
    huge_ints, st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=8), st.integers()
)
keys = st.one_of(
    st.sampled_from(PARAM_NAMES),
    st.text(max_size=12),
    st.integers(),
    st.none(),
    st.booleans(),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.floats(allow_nan=True),
)
plain_values = st.recursive(
    plain_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.one_of(words, st.text(max_size=8)), children, max_size=4)
    ),
    max_leaves=12,
)
values = st.one_of(
    plain_scalars,
    plain_scalars,
    plain_values,
    st.recursive(
        st.one_of(plain_scalars, nasty_scalars),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(keys, children, max_size=4),
            st.frozensets(st.integers(), max_size=3),
        ),
        max_leaves=25,
    ),
)
real_stage = st.sampled_from(PASS_NAMES).flatmap(
    lambda name: st.dictionaries(
        st.sampled_from(PARAMS_OF[name]) if PARAMS_OF[name] else st.sampled_from(PARAM_NAMES), values, max_size=4
    ).map(lambda params: {"pass": name, **params})
)
odd_stage = st.one_of(
    st.builds(
        lambda name, params: {"pass": name, **params},
        st.sampled_from(PASS_NAMES),
        st.dictionaries(keys, values, max_size=3),
    ),
    values,
)
stages = st.integers(0, 9).flatmap(lambda i: real_stage if i < 8 else odd_stage)
well_formed = st.builds(lambda s: {"stages": s}, st.lists(stages, min_size=1, max_size=3))
other_recipes = st.one_of(
    st.builds(
        lambda s, extra: {"stages": s, **extra},
        st.lists(stages, max_size=3),
        st.dictionaries(st.sampled_from(["name", "description", "stagse"]), values, max_size=2),
    ),
    st.dictionaries(keys, values, max_size=3),
    values,
)
recipes = st.integers(0, 9).flatmap(lambda i: well_formed if i < 7 else other_recipes)  # 70% shaped like recipes


def only_sparsifx_errors(fn, arg) -> str:
    """'accepted' or 'refused'; any exception other than a SparsifxError propagates and fails the test."""
    try:
        fn(arg)
    except SparsifxError as exc:
        assert len(str(exc)) < 20_000, len(str(exc))  # values are summarised, never printed whole
        return "refused"
    return "accepted"


@FUZZ
@given(recipes)
def test_fuzzed_dict_recipes(recipe):
    assert only_sparsifx_errors(Recipe.from_dict, recipe) in ("accepted", "refused")
    assert only_sparsifx_errors(Recipe.load, recipe) in ("accepted", "refused")


def _yaml_safe(value):
    """A variant of a fuzzed value that yaml.safe_dump can write (keys made strings, tuples and sets lists)."""
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, int) and value.bit_length() > 4000:  # str() refuses > 4300 digits
        return 2**64
    return value


SEEDS = [
    "stages:\n  - pass: magnitude\n    sparsity: 0.8\n    distribution: erk\n    ignore: [fc]\n"
    "    by_name: {conv1: {sparsity: 0.3}}\n  - pass: fold_bn\n",
    "name: r\nstages: [{pass: rigl, sparsity: 0.9, delta_t: 100, by_type: {Linear: {sparsity: 0.5}}}]\n",
    "stages: [{pass: lower, backend: auto, cache_dir: /tmp/x, kernels: [csr]}]\n",
]
INSERTS = [
    "&a ",
    "*a",
    "!!python/object/apply:os.system ['true'] ",
    "!!binary ",
    "!!set ",
    "<<: ",
    "? ",
    "[" * 40,
    "{" * 40,
    "]",
    "}",
    ": ",
    "- ",
    "\n  ",
    "\t",
    "\x00",
    "'",
    '"',
    "#",
    "1e999",
    ".nan",
    "9" * 5000,
    "0x" + "f" * 300,
    "2024-01-01",
    "~",
    "%YAML 1.1\n---\n",
    "\n---\n",
    "\ufeff",
    "\\u0000",
    "|\n  ",
    ">-\n  ",
    "!!timestamp ",
    "!!float ",
    "!!int ",
    "!!str ",
    "!foo ",
]


@st.composite
def mutated_yaml(draw) -> str:
    text = draw(
        st.one_of(st.sampled_from(SEEDS), recipes.map(lambda r: yaml.safe_dump(_yaml_safe(r), allow_unicode=True)))
    )
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "duplicate", "text"]))
        if action == "insert":
            text = text[:pos] + draw(st.sampled_from(INSERTS)) + text[pos:]
        elif action == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)) :]
        elif action == "duplicate":
            text = text[:pos] + text[pos : pos + 40] * draw(st.integers(2, 50)) + text[pos:]
        else:
            text = text[:pos] + draw(st.text(max_size=10)) + text[pos:]
    return text


@FUZZ
@given(mutated_yaml())
def test_fuzzed_yaml_recipes(text):
    assert only_sparsifx_errors(Recipe.from_yaml, text) in ("accepted", "refused")


@FUZZ
@given(st.text(max_size=300))
def test_random_text(text):
    assert only_sparsifx_errors(Recipe.from_yaml, text) in ("accepted", "refused")
    assert only_sparsifx_errors(Recipe.load, text) in ("accepted", "refused")
