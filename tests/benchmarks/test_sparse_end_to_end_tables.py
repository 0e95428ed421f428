"""The table code of benchmarks/sparse_end_to_end.py and sparse_target_cell.py on hand-made results."""


def test_kept_label_names_onnxruntime_chunks_or_lowered(load_benchmark):
    e2e = load_benchmark("sparse_end_to_end")
    assert e2e.kept_label({"whole_model": {"kept": "onnxruntime"}, "micro_batch": {"kept": "chunks"}}) == "onnxruntime"
    assert e2e.kept_label({"micro_batch": {"kept": "chunks", "size": 1}}) == "lowered, 1 at a time"
    assert e2e.kept_label({"micro_batch": {"kept": "whole batch", "size": 1}}) == "lowered"
    assert e2e.kept_label({}) == "lowered"


def test_target_cell_markdown_lists_every_run_and_the_spread(load_benchmark):
    cell = load_benchmark("sparse_target_cell")
    runs = [
        {"run": i, "meta": {"load_before": [0.5], "load_after": [0.6]}, "cell": {"lowered_x_ort": r, "rounds": 11}}
        for i, r in enumerate((2.9, 3.1), 1)
    ]
    text = cell.markdown(runs)
    assert text.count("\n| 1 |") == 1 and text.count("\n| 2 |") == 1
    assert "min 2.9, max 3.1 over 2 runs" in text
