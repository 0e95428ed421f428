"""Smoke test of benchmarks/truly_sparse.py at tiny sizes: functions, row schemas, outputs (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("truly_sparse")


def test_build_sparse_mlp_er_density_and_set_evolution(bench):
    from sparsifx.sparse_linear import SparseLinear

    widths = (20, 48, 48, 3)
    model = bench.build_sparse_mlp(widths, epsilon=4, seed=0)
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert len(layers) == 3 and not any(isinstance(m, torch.nn.Linear) for m in model)
    assert sum(m.nnz for m in layers) == bench.er_nnz(widths, 4)
    for layer, (a, b) in zip(layers, zip(widths[:-1], widths[1:])):
        assert layer.density() == pytest.approx(bench.er_density(a, b, 4), abs=1.0 / (a * b))
    assert layers[-1].density() == 1.0  # the readout's ER density is clipped at 1
    ctrl = bench.set_controller(model, epsilon=4, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl.attach(opt, steps_per_epoch=2, epochs=2)
    x, y = torch.randn(8, 20), torch.randint(0, 3, (8,))
    before = ctrl.nnz()
    losses = [bench.train_step(model, opt, x, y) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses)
    kinds = {h["kind"] for h in ctrl.history}
    assert kinds == {"set"}  # one evolution after epoch 1, none after the last epoch
    assert {h["layer"] for h in ctrl.history} == set(ctrl.names[:-1])  # the output layer keeps its topology
    assert ctrl.nnz() == before
    sb = ctrl.state_bytes()
    assert sb["parameters"] == sb["gradients"] == sb["optimizer_state"] > 0 and sb["topology"] > 0


def test_helpers(bench):
    xs = [10, 100, 1000]
    assert bench.loglog_slope(xs, [3 * x**1.1 for x in xs]) == pytest.approx(1.1)
    assert bench.loglog_slope([1], [1]) is None
    mean, lo, hi = bench.paired_t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo < 2.0 < hi and hi - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)
    model = bench.mlp((5, 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bench.train_step(model, opt, torch.randn(3, 5), torch.tensor([0, 1, 0]))
    sb = bench.dense_state_bytes(model, opt)
    n = 4 * (5 * 4 + 4 + 4 * 2 + 2)
    assert sb == {"parameters": n, "gradients": n, "optimizer_state": n, "topology": 0, "total": 3 * n}
    est = bench.b_estimates(262144, 20)
    assert not est["dense_state_bytes"] < 8 * 2**30  # the 256k-wide dense MLP cannot be trained here


def test_b_worker_in_process_schema(bench):
    row = bench.b_worker("sparse", 32, 4, threads=1, budget_s=0.01, min_steps=2, max_steps=2, warmup=1)
    assert row["timed_steps"] == 2 and row["median_step_s"] > 0
    assert row["nnz"] == bench.er_nnz((784, 32, 32, 32, 10), 4) == row["nnz_after_evolve"]
    assert row["peak_rss_mb"] >= row["rss_after_import_mb"] > 0
    assert {r["kind"] for r in row["evolve_records"]} == {"set"}
    dense = bench.b_worker("dense", 32, 4, threads=1, budget_s=0.01, min_steps=2, max_steps=2, warmup=1)
    assert dense["nnz"] == 784 * 32 + 2 * 32 * 32 + 32 * 10


def test_quick_parts_a_c_d_and_outputs(bench, tmp_path):
    out = tmp_path / "ts.json"
    res = bench.run(["a", "c", "d"], out, quick=True)
    a = res["a"]["rows"]
    assert [r["variant"] for r in a] == ["dense", "masked", "sparse"]
    assert a[0]["step_ratio"] == 1.0 and a[0]["ppo_ratio"] == 1.0
    sparse = a[2]
    assert sparse["ppo_ratio"] < 0.5 and sparse["state_bytes"]["topology"] > 0
    assert sparse["executed_flops_ratio"] == pytest.approx(0.1, abs=0.02)
    c = res["c"]
    assert c["finished"] and len(c["epochs_log"]) == 2 and c["epochs_log"][0]["set_evolutions"] > 0
    assert c["epochs_log"][1]["set_evolutions"] == 0 and c["nnz_end"] == c["nnz"]
    assert 0.0 <= c["epochs_log"][-1]["test_accuracy"] <= 1.0
    d = res["d"]
    assert {(r["storage"], r["method"]) for r in d["rows"]} == {
        (s, m) for s in ("masked", "sparse") for m in ("set", "rigl")
    }
    for cell in d["summary"]:
        assert cell["paired_seeds"] == 2 and len(cell["diff_val"]["diffs"]) == 2
    assert json.loads(out.read_text())["meta"]["parts"].keys() == {"a", "c", "d"}
    md = out.with_suffix(".md").read_text()
    assert "## (a)" in md and "## (c)" in md and "## (d)" in md and "Targets at 98" not in md
    # part (b) from a saved-looking result renders a table and a plot
    rows = [
        {
            "variant": "sparse",
            "width": w,
            "nnz": n,
            "median_step_s": n * 1e-7,
            "min_step_s": n * 1e-7,
            "timed_steps": 5,
            "peak_rss_mb": 700 + n * 1e-5,
            "rss_after_import_mb": 700.0,
            "state_bytes": {"total": 24 * n},
            "evolve_s": 0.1,
            "dense_params": 10 * n,
            "dense_fits_ram": True,
            "masked_fits_ram": True,
        }
        for w, n in ((1024, 10**5), (4096, 10**6))
    ]
    rows.append(
        {
            "variant": "dense",
            "width": 4096,
            "skipped": True,
            "reason": "test",
            "dense_params": 10**7,
            "dense_fits_ram": False,
            "masked_fits_ram": False,
            "nnz_expected": 10**6,
        }
    )
    res["b"] = {
        "settings": {
            "widths": [1024, 4096],
            "epsilon": 20,
            "batch": 100,
            "threads": 2,
            "cap_gb": 8,
            "budget_s_per_worker": 1,
            "mem_available_gb": 20.0,
            "optimizer": "sgd",
            "sparse_model": "x",
            "masked_model": "y",
        },
        "rows": rows,
        "fits": {},
    }
    bench.save(res, out)
    assert res["b"]["fits"]["time_slope"] == pytest.approx(1.0) and res["b"]["fits"][
        "state_bytes_slope"
    ] == pytest.approx(1.0)
    assert "## (b)" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
