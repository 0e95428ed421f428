"""benchmarks/harness.py: interleaved timing on fake clocks, onnxruntime sessions, result files."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def harness(load_benchmark):
    return load_benchmark("harness")


def _fake(state: dict, key: str, refill: float = 10.0, repeat: float = 1.0):
    def fn():
        state["now"] += repeat if state["last"] == key else refill
        state["last"] = key

    return fn


def test_interleaved_timing_drops_the_cache_refill_call(harness):
    """A call right after another model's costs 10 s on a fake clock, a repeated call 1 s: blocks of 3
    time only the repeated calls (steady state); single interleaved calls mostly pay the refill."""
    state = {"now": 0.0, "last": None}
    fns = {"dense": _fake(state, "dense"), "shrunk": _fake(state, "shrunk")}
    steady = harness.interleaved_ms(fns, budget_s=0.0, min_rounds=6, clock=lambda: state["now"], block=3)
    assert steady == {"dense": 1000.0, "shrunk": 1000.0}
    single = harness.interleaved_ms(fns, budget_s=0.0, min_rounds=6, max_rounds=6, clock=lambda: state["now"], block=1)
    assert max(single.values()) == 10000.0


def test_interleaved_samples_warmup_calls_hooks_and_several_clocks(harness):
    state = {"now": 0.0, "last": None}
    fns = {"a": _fake(state, "a", 4.0, 2.0), "b": _fake(state, "b", 4.0, 2.0)}
    rounds = []

    def fake_clock():
        return state["now"]

    samples = harness.interleaved_samples(
        fns, 5, warmup_rounds=2, calls=3, before_round=rounds.append, clocks=(fake_clock, "wall")
    )
    assert rounds == list(range(7)) and set(samples) == {"fake_clock", "wall"}
    per_call = samples["fake_clock"]
    assert {k: len(v) for k, v in per_call.items()} == {"a": 5, "b": 5}  # warm-up rounds dropped
    # 3 calls in a row per sample: the first may pay the refill (4), the other two 2 each
    assert all(2 - 1e-9 <= s <= 8 / 3 + 1e-9 for v in per_call.values() for s in v)
    with pytest.raises(ValueError, match="distinct names"):
        harness.interleaved_samples(fns, 1, clocks=(fake_clock, fake_clock))


def test_interleaved_order_is_shuffled_and_seeded(harness):
    seen = []
    fns = {k: (lambda k=k: seen.append(k)) for k in "abcd"}
    harness.interleaved_samples(fns, 6, clocks=("wall",))
    first = list(seen)
    orders = {tuple(first[i : i + 4]) for i in range(0, 24, 4)}
    assert len(orders) > 1 and all(sorted(o) == list("abcd") for o in orders)
    seen.clear()
    harness.interleaved_samples(fns, 6, clocks=("cpu",))
    assert seen == first  # seed 0 by default: the same orders


def test_timed_calls_and_clock_names(harness):
    assert len(harness.timed_calls(lambda: None, 4, "cpu")) == 4
    with pytest.raises(ValueError, match="unknown clock"):
        harness.timed_calls(lambda: None, 1, "sundial")


def test_ort_session_from_path_and_bytes(harness, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import torch

    model = torch.nn.Linear(4, 3).eval()
    x = torch.randn(2, 4)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False)
    want = model(x).detach().numpy()
    for source in (path, path.read_bytes()):
        session = harness.ort_session(source, threads=1)
        got = session.run(None, harness.ort_feed(session, (x,)))[0]
        assert abs(got - want).max() < 1e-5


def test_results_json_markdown_plot_and_load_line(harness, tmp_path):
    meta = harness.finish(harness.machine(threads=1, clock="cpu", note="x"))
    assert meta["threads"] == 1 and meta["clock"] == "cpu" and len(meta["load_before"]) == 3 and meta["load_after"]
    line = harness.load_line(meta)
    assert "1 thread;" in line and "clock: cpu" in line and "load average" in line
    plotted = []
    out = tmp_path / "sub" / "r.json"
    harness.write_results(out, {"meta": meta, "rows": [1]}, "# r\n", plotted.append)
    assert json.loads(out.read_text())["rows"] == [1] and out.with_suffix(".md").read_text() == "# r\n"
    assert plotted == [out.with_suffix(".png")] and not list(out.parent.glob("*.tmp"))
