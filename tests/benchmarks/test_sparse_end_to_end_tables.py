"""The table code of benchmarks/sparse_end_to_end.py and sparse_target_cell.py on hand-made results."""


def test_kept_label_names_onnxruntime_chunks_or_lowered():
    from sparsifx.bench import runs_on

    assert runs_on({"whole_model": {"kept": "onnxruntime"}, "micro_batch": {"kept": "chunks"}}, "lowered") == (
        "onnxruntime"
    )
    assert runs_on({"micro_batch": {"kept": "chunks", "size": 1}}, "lowered") == "lowered, 1 at a time"
    assert runs_on({"micro_batch": {"kept": "whole batch", "size": 1}}, "lowered") == "lowered"
    assert runs_on({}, "lowered") == "lowered"
    assert runs_on({"micro_batch": {"kept": "chunks", "size": 2}}) == "sparse kernels, 2 at a time"


def test_target_cell_markdown_lists_every_run_and_the_spread(load_benchmark):
    cell = load_benchmark("sparse_target_cell")
    runs = [
        {"run": i, "meta": {"load_before": [0.5], "load_after": [0.6]}, "cell": {"lowered_x_ort": r, "rounds": 11}}
        for i, r in enumerate((2.9, 3.1), 1)
    ]
    text = cell.markdown(runs)
    assert text.count("\n| 1 |") == 1 and text.count("\n| 2 |") == 1
    assert "min 2.9, max 3.1 over 2 runs" in text
