"""CI-sized torchvision channel-pruning sweep: the sweep's per-model logic (no latency) on 14 models.

Each model is built (random weights, BatchNorm calibrated), traced, pruned 50 % with ``channel_prune``,
shrunk, checked shrunk == masked (``assert_close``), its params/MACs must drop, and it is exported to ONNX
(``fold_bn`` first) with onnxruntime parity. Together the models exercise every channel rule
(residual add, cat, grouped/depthwise conv, SE gating, channel shuffle, flatten->Linear, LayerNorm2d/
permute, attention heads, Swin windows). All 14 run in the default (CI) test run, about 30 s in all.
"""

from __future__ import annotations

import pytest

CI_MODELS = [
    "resnet18",
    "resnext50_32x4d",
    "densenet121",
    "googlenet",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "regnet_y_400mf",
    "convnext_tiny",
    "vgg11",
    "vit_b_16",
    "swin_t",
]
# Swin's shifted-window attention is decomposed (passes/channels/window_attention.py), so it prunes like the rest
MAX_MACS_RATIO: dict[str, float] = {}


def _check(worker, name: str, tmp_path) -> None:
    rec = worker.sweep_sparsifx(
        name, ratio=0.5, mode="ci", onnx=True, measure=False, workdir=str(tmp_path), repeat=False
    )
    assert rec["ok"], f"{name}: {rec['error']}"
    assert rec["error"] is None
    st = rec["stats"]
    assert st["shrunk_vs_masked_max_abs"] < 1e-2
    # 50 % of the channels of every group: params and MACs fall well below the dense model
    assert st["params_after"] < 0.75 * st["params_before"], st
    assert st["macs_after"] < MAX_MACS_RATIO.get(name, 0.75) * st["macs_before"], st
    assert st["onnx_max_abs"] is not None and st["onnx_max_abs"] < 1e-3


@pytest.mark.parametrize("name", CI_MODELS)
def test_sweep_ci(load_benchmark, name, tmp_path):
    _check(load_benchmark("prune_sweep_worker"), name, tmp_path)


def test_sweep_summary_and_table_from_records(load_benchmark):
    """The driver's summary/markdown on two synthetic records (ratios, coverage, failures named)."""
    sweep = load_benchmark("torchvision_sweep")
    ok = {
        "model": "a",
        "tool": "sparsifx",
        "side": 64,
        "ok": True,
        "error": None,
        "stats": {
            "time_s": 1.0,
            "macs_ratio": 0.25,
            "params_ratio": 0.25,
            "eager_latency_over_macs": 1.2,
            "ort_latency_over_macs": 1.05,
            "physical_ratio": 1.01,
        },
    }
    bad = {"model": "b", "tool": "sparsifx", "side": 64, "ok": False, "error": "prune+shrink: X: y", "stats": {}}
    tp_ok = {"model": "a", "tool": "torch-pruning", "ok": True, "error": None, "stats": {"time_s": 4.0}}
    tp_bad = {"model": "b", "tool": "torch-pruning", "ok": False, "error": "memory: killed", "stats": {}}
    records = {"a": {"sparsifx": ok, "torch-pruning": tp_ok}, "b": {"sparsifx": bad, "torch-pruning": tp_bad}}
    s = sweep.summary(records)
    assert s["sparsifx_ok"] == 1 and s["sparsifx_failures"] == {"b": "prune+shrink: X: y"}
    assert s["torch_pruning_ok"] == 1 and s["median_time_ratio_sparsifx_over_tp"] == 0.25
    assert s["physical_ratio"] == {"a": 1.01} and s["median_ort_latency_over_macs"] == 1.05
    assert s["ort_latency_over_macs_at_most_1_1"] == "1/1"
    table = sweep.markdown(records, {"ratio": 0.5, "mode": "ci", "summary": s})
    assert "| b | 64 | NO |" in table and "TP memory: killed" in table
