"""The kernel bookkeeping of benchmarks/ort_latency_breakdown.py on hand-made profiler events."""

import pytest


@pytest.fixture(scope="module")
def breakdown(load_benchmark):
    return load_benchmark("ort_latency_breakdown")


def _event(op, inputs, output, sizes=(100, 50, 10)):
    return {
        "args": {
            "op_name": op,
            "input_type_shape": [{"float": s} for s in inputs],
            "output_type_shape": [{"float": output}],
            "activation_size": str(sizes[0]),
            "output_size": str(sizes[1]),
            "parameter_size": str(sizes[2]),
        }
    }


def test_kernel_facts_sort_gemm_from_per_channel_work(breakdown):
    conv = _event("Conv", [[1, 16, 8, 8], [32, 16, 3, 3], [32]], [1, 32, 8, 8])
    assert breakdown.kernel_facts(conv) == ("gemm", 32 * 8 * 8 * 16 * 9, 160)
    depthwise = _event("FusedConv", [[1, 32, 8, 8], [32, 1, 3, 3]], [1, 32, 8, 8])
    assert breakdown.kernel_facts(depthwise) == ("per-channel", 32 * 8 * 8 * 9, 160)
    grouped = _event("Conv", [[1, 32, 8, 8], [32, 8, 3, 3]], [1, 32, 8, 8])  # 4 groups of 8
    assert breakdown.kernel_facts(grouped) == ("grouped", 32 * 8 * 8 * 8 * 9, 160)
    gemm = _event("Gemm", [[1, 64], [1000, 64], [1000]], [1, 1000])
    assert breakdown.kernel_facts(gemm) == ("gemm", 1000 * 64, 160)
    assert breakdown.kernel_facts(_event("Add", [[1, 32, 8, 8]] * 2, [1, 32, 8, 8]))[:2] == ("per-channel", 0)


def test_summarize_bounds(breakdown):
    # dense: a gemm kernel (4 ms) and a per-channel kernel (1 ms); pruned: MACs 4x and 2x smaller
    dense = [
        {"kind": "gemm", "macs": 400, "bytes": 40, "ms": 4.0},
        {"kind": "per-channel", "macs": 100, "bytes": 100, "ms": 1.0},
    ]
    shrunk = [
        {"kind": "gemm", "macs": 100, "bytes": 20, "ms": 1.5},
        {"kind": "per-channel", "macs": 50, "bytes": 50, "ms": 0.5},
    ]
    row = breakdown.summarize("m", 224, 0.3, {"dense": 5.5, "shrunk": 2.2}, {"dense": dense, "shrunk": shrunk})
    assert row["latency_over_macs"] == pytest.approx(0.4 / 0.3)
    assert row["kernel_ratio"] == pytest.approx(2.0 / 5.0)
    assert row["overhead_share"] == pytest.approx(0.5 / 5.5)
    assert row["kinds"]["gemm"]["time_ratio"] == pytest.approx(0.375)
    assert row["kinds"]["per-channel"]["share"] == pytest.approx(0.2)
    # perfect kernels: gemm 4 ms x 0.25 + per-channel 1 ms x 0.5 = 1.5 ms of 5 ms, over the MACs ratio 0.3
    assert row["bound"] == pytest.approx(1.5 / 5.0 / 0.3)
    # peaks: 100 MACs/ms (dense gemm), 100 bytes/ms (per-channel) -> dense 4 + 1 ms, shrunk 1 + 0.5 ms
    assert row["roofline_over_macs"] == pytest.approx(1.5 / 5.0 / 0.3)
    table = breakdown.markdown([row], {"note": "n", "command": "c"})
    assert "| m | 224 | 0.300 | 1.33 | 1.33 | 0.09 | 0.80 | 0.375 · 0.250 · 0.500 |  |  | 0.20 |" in table
