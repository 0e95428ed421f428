"""``benchmarks/zoo_sweep.py`` on timm's tiny test models: worker records, re-randomisation, summary, CLI.

timm is an optional extra (``pip install -e .[timm]``): the module is skipped without it.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def z(load_benchmark):
    return load_benchmark("zoo_sweep")


def test_worker_prunes_a_tiny_timm_model_exactly_and_exports_it(z, tmp_path):
    rec = z.sweep_sparsifx("test_resnet", side=64, workdir=str(tmp_path), repeat=False)
    assert rec["ok"] and rec["error"] is None, rec["error"]
    st = rec["stats"]
    assert st["randomised"]["norm_affine"] > 0 and st["randomised"]["bn_stats"] == st["randomised"]["norm_affine"]
    assert st["params_ratio"] <= z.REALLY_PRUNED and st["macs_ratio"] < 0.6
    assert st["shrunk_vs_masked_max_abs"] < 1e-4 and st["onnx_max_abs"] < 1e-3
    assert st["outcome"]["achieved"] == pytest.approx(0.5, abs=0.02) and not st["outcome"]["blockers"]
    assert st["top_barrier"].startswith("no barrier")


def test_barely_pruned_model_is_named_with_its_top_barrier(z, tmp_path):
    """timm's ConvNeXt normalises over channels with layer_norm: a barrier that holds the stages whole."""
    st = z.sweep_sparsifx("test_convnext", side=64, onnx=False, repeat=False)["stats"]
    assert st["params_ratio"] > z.REALLY_PRUNED
    assert re.match(r"layer_norm '\w+' \(\+\d+ more\): \d+ ch, layer_norm statistics", st["top_barrier"])
    assert st["outcome"]["achieved"] < st["outcome"]["requested"] - 0.1


def test_randomise_redraws_layer_scales_and_norms(z):
    import torch

    model, _, done = z.build("timm", "test_convnext", 64, 10)
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert gammas and done["constant_vectors"] >= len(gammas)
    for g in (g.detach() for g in gammas):  # timm initialises layer scales to 1e-6 everywhere
        assert float(g.min()) >= 0.5 and float(g.max()) <= 1.0 and g.std() > 0
    norms = [m for m in model.modules() if z._is_norm(m) and getattr(m, "weight", None) is not None]
    assert norms and all(not torch.all(m.weight == 1) for m in norms)


def test_torch_pruning_side_on_the_same_model(z):
    pytest.importorskip("torch_pruning")
    rec = z.sweep_torch_pruning("test_resnet", side=64)
    assert rec["ok"], rec["error"]
    assert rec["stats"]["params_ratio"] < 0.6 and rec["stats"]["time_s"] > 0


def test_summary_and_table_name_barriers_and_failures(z):
    outcome = {"requested": 0.5, "achieved": 0.1, "channels": 100, "removed": 10, "blockers": [], "other_fixed": 0}
    good = {
        "model": "a",
        "tool": "sparsifx",
        "side": 128,
        "ok": True,
        "error": None,
        "stats": {
            "params_ratio": 0.3,
            "time_s": 1.0,
            "shrunk_vs_masked_max_abs": 1e-7,
            "onnx_max_abs": 1e-6,
            "outcome": {**outcome, "achieved": 0.5},
            "top_barrier": "no barrier",
            "params_before": 1e6,
        },
    }
    poor = {
        **good,
        "model": "b",
        "stats": {
            **good["stats"],
            "params_ratio": 0.9,
            "outcome": outcome,
            "top_barrier": "LayerNorm 'norm': 80 ch, spans channels",
        },
    }
    bad = {"model": "c", "tool": "sparsifx", "side": 128, "ok": False, "error": "build: TypeError: x", "stats": {}}
    tp = {
        "model": "a",
        "tool": "torch-pruning",
        "side": 128,
        "ok": True,
        "error": None,
        "stats": {"params_ratio": 0.2, "time_s": 0.5},
    }
    records = {"a": {"sparsifx": good, "torch-pruning": tp}, "b": {"sparsifx": poor}, "c": {"sparsifx": bad}}
    s = z.summary(records)
    assert s["really_pruned"] == "1/2" and s["above_0_8"] == {"b": "LayerNorm 'norm': 80 ch, spans channels"}
    assert s["sparsifx_failures"] == {"c": "build: TypeError: x"} and s["achieved_short_by_over_0_1"] == ["b"]
    assert s["median_time_ratio_sparsifx_over_tp"] == 2.0 and s["tp_prunes_more_by_over_0_05"] == ["a"]
    table = z.markdown(records, {"zoo": "timm", "ratio": 0.5, "round_to": 1, "num_classes": 1000, "summary": s})
    assert "- b: LayerNorm 'norm'" in table and "| c | 128 | NO |" in table and "0.10 / 0.50" in table


def test_cli_refuses_a_zoo_that_is_not_there_yet(z, capsys, monkeypatch):
    monkeypatch.setitem(z.PLANNED, "onnx", "the ONNX model zoo is not implemented yet")
    with pytest.raises(SystemExit) as info:
        z.parse(["--zoo", "onnx"])
    assert info.value.code == 2 and "not implemented yet" in capsys.readouterr().err
    args = z.parse(["--zoo", "timm", "--models", "resnet18"])
    assert args.out.name == "zoo_timm.json" and args.round_to == 1
    assert z.parse(["--zoo", "hf"]).out.name == "zoo_hf.json"


def test_hf_sweep_prunes_tiny_bert_exactly_and_reports_it(z, tmp_path):
    """``--zoo hf``: one tiny BERT through the sparsifx side (trace, magnitude, exact channel_prune + shrink with
    params over blocks and whole model, ONNX parity; approximate streams with its deviations and ONNX parity
    against the shrunk model; exact whole heads), then the summary and table built from its record."""
    pytest.importorskip("transformers")
    rec = z.sweep_hf_sparsifx("bert", workdir=str(tmp_path), repeat=False)
    assert rec["ok"] and rec["error"] is None, rec["error"]
    st = rec["stats"]
    assert st["linear_layers"] == st["linear_visible"] == st["magnitude_masked"] == 14
    assert st["opaque_leaves"] == [] and st["magnitude_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert st["randomised"]["norm_affine"] > 0 and st["block_prefixes"] == ["bert.encoder.layer."]
    assert st["shrunk_vs_masked_max_abs"] < 1e-4 and st["onnx_max_abs"] < 1e-3
    assert st["block_params_ratio"] < 0.52 and st["block_params_ratio"] < st["params_ratio"] < 1
    assert st["time_s"] > 0
    # approximate streams: the residual stream is pruned too, not exactly; the deviation is measured
    assert st["approx_block_params_ratio"] <= z.STREAMS_TARGET and st["approx_params_ratio"] < st["params_ratio"]
    assert st["approx_deviation_inputs"] == "example inputs" and st["approx_norms"] == 5 and st["approx_units"] > 0
    assert 0 < st["approx_deviation_approximation"] < st["approx_deviation"] < 2
    assert st["approx_deviation"] == pytest.approx(st["approx_deviation_recomputed"], rel=1e-4)
    assert st["approx_onnx_max_abs"] < 1e-3 and "approx_error" not in st and "approx_onnx_error" not in st
    # whole heads, exact: half of the 2 x 4 query heads kept
    assert st["heads_before"] == [[4, 16], [4, 16]] and st["heads_after"] == [[2, 16], [2, 16]]
    assert st["heads_kept"] == 4 and st["heads_total"] == 8 and st["heads_exact"]
    assert st["heads_shrunk_vs_masked_max_abs"] < 1e-4 and st["heads_block_params_ratio"] < 0.52
    records = {"bert": {"sparsifx": rec}}
    s = z.hf_summary(records)
    assert s["exact_shrunk_eq_masked"] == s["onnx_parity"] == s["sparsifx_all_parts_ok"] == "1/1"
    a = s["approximate_streams"]
    assert a["reach_target"] == a["onnx_parity"] == "1/1" and a["reach_target_models"] == ["bert"]
    assert a["deviations"]["bert"]["shrunk_vs_masked"] == st["approx_deviation_approximation"]
    assert s["attention_heads"]["exact_shrunk_eq_masked"] == "1/1" and s["attention_heads"]["heads_kept"] == {
        "bert": "4/8"
    }
    meta = {"ratio": 0.5, "round_to": 1, "summary": s, "machine": {"cpus": 2, "loadavg_at_write": [1.0, 1.0, 1.0]}}
    table = z.hf_markdown(records, meta)
    assert "| bert | 16 | 14/14 | 14/14 |" in table and "not implemented" not in table and "Machine load" in table
    assert "1/1 models reach blocks ratio <= 0.35" in table
    assert f"{st['approx_deviation']:.3f} / {st['approx_deviation_approximation']:.3f}" in table
    assert f"| {st['approx_block_params_ratio']:.3f} | {st['approx_params_ratio']:.3f} |" in table
    assert "| 4/8 |" in table
