"""Smoke test of benchmarks/sparse_training.py: a few interleaved steps, row schema and value ranges."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")

SCHEMA = {"model", "method", "sparsity", "seed", "accuracy", "flops_ratio", "saved_bytes_ratio", "step_time_ratio"}


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("sparse_training")


def test_quick_run_rows_schema_and_ranges(bench, tmp_path):
    settings = replace(
        bench.QUICK,
        models=("lenet300100",),
        methods=("rigl", "swat"),
        sparsities=(0.9,),
        seeds=(0,),
        n_train=300,
        n_test=100,
        batch=50,
        epochs=2,
        max_steps=8,
    )
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


def test_unregistered_method_is_reported_not_faked(bench):
    present, missing = bench.methods_mod.available(("rigl", "no_such_method"))
    assert present == ["rigl"] and missing == ["no_such_method"]


def test_targets_mode_intervals_density_and_both_flop_columns(bench, tmp_path):
    settings = replace(
        bench.TargetSettings(),
        models=("mlp784x64x64",),
        methods=("static", "rigl", "swat"),
        sparsities=(0.9,),
        seeds=(0, 1),
        lrs=(0.05, 0.1),
        n_train=300,
        n_val=100,
        n_test=100,
        batch=50,
        max_steps=6,
    )
    out = tmp_path / "t.json"
    rows = bench.run_targets(settings, out)
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, s) for s in (0, 1) for m in ("dense", "static", "rigl", "swat")
    ]
    for row in rows:
        assert row["chosen_on"] == "validation" and row["lr"] in (0.05, 0.1)
        assert 0.0 < row["density"] <= 1.0 and row["executed_flops_ratio"] >= row["flops_ratio"] > 0.0
    static = [r for r in rows if r["method"] == "static"]
    assert all(abs(r["density"] - 0.1) < 0.01 for r in static)
    swat = [r for r in rows if r["method"] == "swat"]
    assert all(r["density"] > 0.5 for r in swat)  # SWAT's default keeps the (large) first layer dense
    meta = json.loads(out.with_name("t_meta.json").read_text())
    assert len(meta["tuning_on_validation"]) == 2 * 4 and not meta["partial"]
    assert all(t["result"] in ("PASS", "FAIL", "not distinguishable") for t in meta["targets"])
    table = out.with_suffix(".md").read_text()
    assert "FLOPs theoretical" in table and "FLOPs executed" in table and "95% CI" in table


def test_paired_interval(bench):
    mean, lo, hi = bench.paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and hi - mean == mean - lo
    assert hi - mean == pytest.approx(2.776 * (2.5**0.5) / 5**0.5)
