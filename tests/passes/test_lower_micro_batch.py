"""``lower``'s micro-batch step: a copy planned for one chunk, run chunk by chunk, kept where faster and exact."""

import pytest
import torch
import torch.nn as nn
from lower_helpers import fake_timer, masked

import sparsifx
from sparsifx.backends import cost_model, cpp_kernel
from sparsifx.backends.micro_batch import MicroBatched
from sparsifx.errors import BackendError, PreconditionError, SerializationError

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")
TOL = dict(rtol=1e-4, atol=1e-4)


class Net(nn.Module):
    def __init__(self, mix=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(8, 5)
        self.mix = mix

    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(x)))) + x
        if self.mix:  # mixes the samples of a batch: cannot run in chunks
            y = y - y.mean(0, keepdim=True)
        return self.fc(y.mean((2, 3))), y


def _masked(mix=False, batch=4):
    torch.manual_seed(0)
    return masked(Net(mix), torch.randn(batch, 8, 10, 10))


def _lower(masked, x, **options):
    stage = {"pass": "lower", "whole_model": False, **options}
    return sparsifx.sparsify(masked, {"stages": [stage]}, example_inputs=(x,)).eval()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("winner", ["chunks_of_1", "whole_batch"])
def test_the_faster_is_kept_and_outputs_match(monkeypatch, winner, threads):
    masked, x = _masked()
    monkeypatch.setattr(cost_model, "median_ms", fake_timer(winner))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # auto tries one sample and one per thread
    lowered = _lower(masked, x)
    outcome = lowered.meta["lower_summary"]["micro_batch"]
    assert outcome["kept"] == ("chunks" if winner == "chunks_of_1" else "whole batch")
    assert outcome["sizes"] == sorted({1, threads})
    assert {f"chunks_of_{s}_ms" for s in outcome["sizes"]} | {"whole_batch_ms"} <= set(outcome)
    chunked = [m for m in lowered.modules() if isinstance(m, MicroBatched)]
    assert len(chunked) == (winner == "chunks_of_1")
    if chunked:
        ops = [n.op for n in lowered.graph.nodes]  # the two outputs taken from the module's tuple
        assert ops == ["placeholder", "call_module", "call_function", "call_function", "output"]
        assert any("sample(s) at a time" in note for note in lowered.meta["report_notes"])
        # the body was planned at the chunk's batch: its layers' shapes are those of one sample
        assert (
            lowered.meta["report_extra"]["a"]["dense_macs"] * 4
            == _lower(masked, x, micro_batch=False).meta["report_extra"]["a"]["dense_macs"]
        )
    lowered.graph.lint()
    with torch.inference_mode():
        for batch in (x, x[:1], x[:3], torch.randn(7, 8, 10, 10)):  # any batch, a remainder chunk included
            torch.testing.assert_close(lowered(batch), masked(batch), **TOL)


def test_a_model_that_mixes_samples_is_never_chunked(monkeypatch):
    masked, x = _masked(mix=True)
    monkeypatch.setattr(cost_model, "median_ms", fake_timer("chunks"))
    lowered = _lower(masked, x)
    outcome = lowered.meta["lower_summary"]["micro_batch"]
    assert outcome["kept"] == "whole batch" and "differ" in outcome["skipped"]
    assert not any(isinstance(m, MicroBatched) for m in lowered.modules())
    with pytest.raises(PreconditionError, match="micro_batch 2: the chunked outputs differ"):
        _lower(masked, x, micro_batch=2)


def test_forced_size_and_off():
    masked, x = _masked()
    forced = _lower(masked, x, micro_batch=2)
    (chunked,) = [m for m in forced.modules() if isinstance(m, MicroBatched)]
    assert chunked.size == 2 and forced.meta["lower_summary"]["micro_batch"]["kept"] == "chunks"
    off = _lower(masked, x, micro_batch=False)
    assert "micro_batch" not in off.meta["lower_summary"]
    assert not any(isinstance(m, MicroBatched) for m in off.modules())
    forced_backend = _lower(masked, x, backend="dense")  # a backend named for every layer: auto stays off
    assert "micro_batch" not in forced_backend.meta["lower_summary"]


def test_skip_reasons_are_recorded_or_raised():
    masked, x = _masked(batch=1)
    assert "not larger than the chunk" in _lower(masked, x).meta["lower_summary"]["micro_batch"]["skipped"]
    with pytest.raises(PreconditionError, match="micro_batch 4: the example batch is not larger"):
        _lower(masked, torch.randn(3, 8, 10, 10), micro_batch=4)
    with pytest.raises(Exception, match="micro_batch"):
        _lower(masked, x, micro_batch=0)


def test_chunks_with_a_wrong_batch_are_refused_at_run_time():
    class Sum(nn.Module):
        def forward(self, x):
            return x.sum(0, keepdim=True)

    gm = torch.fx.symbolic_trace(Sum())
    with pytest.raises(BackendError, match="mixes samples"):
        MicroBatched(gm, 2)(torch.randn(3, 2))
    with pytest.raises(BackendError, match="share their first"):
        MicroBatched(gm, 1)(torch.randn(3, 2), torch.randn(2, 2))
    with pytest.raises(BackendError, match="chunk size"):
        MicroBatched(gm, 0)


def test_save_and_load_round_trip(tmp_path):
    masked, x = _masked()
    lowered = _lower(masked, x, micro_batch=2)
    path = tmp_path / "m.sfx"
    sparsifx.save(lowered, path)
    loaded = sparsifx.load(path)
    (chunked,) = [m for m in loaded.modules() if isinstance(m, MicroBatched)]
    assert chunked.size == 2 and isinstance(chunked.body, torch.fx.GraphModule)
    with torch.inference_mode():
        for batch in (x, x[:3]):
            torch.testing.assert_close(loaded(batch), lowered(batch), rtol=0, atol=0)


def _payload(tmp_path):
    from sparsifx.serialization import to_payload

    masked, x = _masked()
    return to_payload(_lower(masked, x, micro_batch=2))


def _body(payload):
    return payload["modules"]["micro_batched"]["children"]["body"]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: _body(p)["graph"][1].update(op="call_function", target="os.system"), "os.system"),
        (lambda p: _body(p).update(class_name="x; import os"), "not an identifier"),
        (lambda p: _body(p).update(graph="nodes"), "expected list"),
        (lambda p: p["modules"]["micro_batched"]["attrs"].update(size=-1), "chunk size"),
        (lambda p: _body(p)["modules"].update(evil={"class": "builtins.eval"}), "expected dict|not allowed|allow"),
    ],
)
def test_a_tampered_nested_graph_is_a_serialization_error(tmp_path, mutate, match):
    from sparsifx.serialization import from_payload

    payload = _payload(tmp_path)
    mutate(payload)
    with pytest.raises(SerializationError, match=match):
        from_payload(payload)


def test_nested_graphs_count_against_the_node_limit(tmp_path):
    from sparsifx.serialization import LoadLimits, from_payload

    payload = _payload(tmp_path)
    outer, inner = len(payload["graph"]), len(_body(payload)["graph"])
    from_payload(payload, LoadLimits(max_nodes=outer + inner))
    with pytest.raises(SerializationError, match="nodes"):
        from_payload(_payload(tmp_path), LoadLimits(max_nodes=outer + inner - 1))
