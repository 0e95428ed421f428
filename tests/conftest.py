"""Fixtures shared by the whole suite.

Test helpers meant for reuse live in ``sparsifx.testing`` (public: custom-pass authors test the same way); the
benchmark scripts are a package, ``benchmarks``, that tests import through the ``load_benchmark`` fixture.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _benchmarks_package():
    """The repository's ``benchmarks`` package: imported normally when the repository root is on ``sys.path``
    (``python -m pytest`` from the root), else from its path, without touching ``sys.path``."""
    module = sys.modules.get("benchmarks")
    if module is not None and Path(getattr(module, "__file__", "") or "").resolve().parent == BENCHMARKS:
        return module
    spec = importlib.util.spec_from_file_location(
        "benchmarks", BENCHMARKS / "__init__.py", submodule_search_locations=[str(BENCHMARKS)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return module


def import_benchmark(name: str):
    """``benchmarks.<name>`` (e.g. ``"zoo_sweep"``), imported once per session."""
    _benchmarks_package()
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("zoo_sweep")`` -> the module ``benchmarks/zoo_sweep.py`` (as ``benchmarks.zoo_sweep``)."""
    return import_benchmark
