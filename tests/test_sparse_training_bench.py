"""Smoke test of benchmarks/sparse_training.py: a few interleaved steps, row schema and value ranges."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"model", "method", "sparsity", "seed", "accuracy", "flops_ratio", "saved_bytes_ratio", "step_time_ratio"}


def _load_bench():
    name = "sparse_training_bench_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "sparse_training.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_quick_run_rows_schema_and_ranges(tmp_path):
    bench = _load_bench()
    settings = replace(bench.QUICK, models=("lenet300100",), methods=("rigl", "swat"), sparsities=(0.9,),
                       seeds=(0,), n_train=300, n_test=100, batch=50, epochs=2, max_steps=8)
    out = tmp_path / "st.json"
    rows = bench.run(settings, out, resnet=False)

    assert [r["method"] for r in rows] == ["dense", "rigl", "swat"]
    assert rows == json.loads(out.read_text())
    for row in rows:
        assert set(row) == SCHEMA
        assert row["model"] == "lenet300100" and row["seed"] == 0
        assert 0.0 <= row["accuracy"] <= 1.0
        for key in ("flops_ratio", "saved_bytes_ratio", "step_time_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0.0, (row["method"], key, row[key])
    dense, rigl, swat = rows
    assert dense["sparsity"] == 0.0
    assert dense["flops_ratio"] == dense["saved_bytes_ratio"] == dense["step_time_ratio"] == 1.0
    assert rigl["sparsity"] == swat["sparsity"] == 0.9
    # a 90%-sparse method must count fewer training FLOPs than dense; SWAT must keep fewer bytes for backward
    assert rigl["flops_ratio"] < 1.0 and swat["flops_ratio"] < 1.0
    assert swat["saved_bytes_ratio"] < 1.0
    for suffix in (".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert "| lenet300100 | rigl | 0.90 | 1 |" in table and "## Targets" in table
    meta = json.loads(out.with_name("st_meta.json").read_text())
    assert meta["missing_methods"] == [] and meta["settings"]["max_steps"] == 8


def test_unregistered_method_is_reported_not_faked():
    bench = _load_bench()
    present, missing = bench.methods_mod.available(("rigl", "no_such_method"))
    assert present == ["rigl"] and missing == ["no_such_method"]
