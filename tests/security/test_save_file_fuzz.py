"""Property-based fuzzing of save files: only SparsifxError escapes ``load`` and the report of what it loads."""

from __future__ import annotations

import functools
import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from save_mutations import MUTATIONS, FuzzNet, good_file, mutate

from sparsifx.errors import SparsifxError
from sparsifx.reporting import report
from sparsifx.serialization import load


@functools.lru_cache(maxsize=1)
def _good():
    return good_file()


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(kind=st.sampled_from(sorted(MUTATIONS)), seed=st.integers(0, 2**32 - 1))
def test_mutated_save_file_only_raises_sparsifx_error(kind, seed, tmp_path):
    data, payload = _good()
    path = tmp_path / "fuzz.sfx"
    path.write_bytes(mutate(kind, data, payload, random.Random(seed)))
    try:
        module = load(path)
        outcome = "accepted" if report(module, None) is not None else "no report"
    except SparsifxError:  # anything else propagates and fails the test
        outcome = "refused"
    assert outcome in ("accepted", "refused")


def test_unmutated_file_loads_and_matches(tmp_path):
    data, _ = _good()
    (tmp_path / "good.sfx").write_bytes(data)
    loaded = load(tmp_path / "good.sfx").eval()
    torch.manual_seed(0)
    model = FuzzNet().eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
