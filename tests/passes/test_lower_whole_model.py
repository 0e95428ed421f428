"""``lower``'s whole-model step: the lowered model against the dense model in onnxruntime, the faster kept."""

import pytest
import torch
import torch.nn as nn
from lower_helpers import fake_timer, masked

import sparsifx
from sparsifx.backends import cost_model, cpp_kernel
from sparsifx.backends.ort_graph import OrtGraph

pytestmark = pytest.mark.skipif(not cpp_kernel.available(), reason="needs a C++ compiler")
TOL = dict(rtol=1e-4, atol=1e-4)


class Net(nn.Module):
    def __init__(self, cumsum=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.bn = nn.BatchNorm2d(16)
        self.cumsum = cumsum

    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(x)))) + x
        return y.cumsum(1) if self.cumsum else y


def _masked(cumsum=False):
    torch.manual_seed(0)
    return masked(Net(cumsum), torch.randn(2, 8, 12, 12))


@pytest.mark.parametrize("winner", ["onnxruntime", "lowered"])
def test_the_faster_is_kept_and_outputs_match(monkeypatch, winner):
    masked, x = _masked()
    monkeypatch.setattr(cost_model, "median_ms", fake_timer(winner))
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower"}]}, example_inputs=(x,)).eval()
    outcome = lowered.meta["lower_summary"]["whole_model"]
    assert outcome["kept"] == winner
    modules = [type(m) for m in lowered.modules()]
    assert (OrtGraph in modules) == (winner == "onnxruntime")
    if winner == "onnxruntime":
        assert [n.op for n in lowered.graph.nodes] == ["placeholder", "call_module", "output"]
        assert any("onnxruntime runs it" in note for note in lowered.meta["report_notes"])
    lowered.graph.lint()
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), masked(x), **TOL)
        torch.testing.assert_close(lowered(x[:1]), masked(x[:1]), **TOL)  # any batch size


def test_forced_backend_skips_the_comparison():
    masked, x = _masked()
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower", "backend": "direct"}]}, example_inputs=(x,))
    assert "whole_model" not in lowered.meta["lower_summary"]


def test_switched_off():
    masked, x = _masked()
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower", "whole_model": False}]}, example_inputs=(x,))
    assert "whole_model" not in lowered.meta["lower_summary"]


def test_an_op_onnxruntime_path_lacks_is_named_and_the_lowered_model_kept():
    masked, x = _masked(cumsum=True)
    lowered = sparsifx.sparsify(masked, {"stages": [{"pass": "lower"}]}, example_inputs=(x,)).eval()
    outcome = lowered.meta["lower_summary"]["whole_model"]
    assert outcome["kept"] == "lowered" and "CumSum" in outcome["skipped"]
    with torch.inference_mode():
        torch.testing.assert_close(lowered(x), masked(x), **TOL)


def test_skip_reasons():
    from passes.lower_whole_model import _skip_reason

    gm, x = _masked()
    assert "no example inputs" in _skip_reason(gm, None)
    assert "float32" in _skip_reason(gm, (x.double(),))
    assert _skip_reason(gm, (x,)) is None


@pytest.mark.parametrize("margin, kept", [(None, "onnxruntime"), (1.1, "onnxruntime"), (1.01, "lowered")])
def test_a_near_tie_goes_to_onnxruntime(monkeypatch, margin, kept):
    masked, x = _masked()

    def median_ms(fns, reps=7, **_):
        return {k: {"lowered": 1.0, "onnxruntime": 1.05}.get(k, 1.0) for k in fns}

    monkeypatch.setattr(cost_model, "median_ms", median_ms)
    stages = [{"pass": "lower", **({} if margin is None else {"whole_model_margin": margin})}]
    lowered = sparsifx.sparsify(masked, {"stages": stages}, example_inputs=(x,))
    assert lowered.meta["lower_summary"]["whole_model"]["kept"] == kept
