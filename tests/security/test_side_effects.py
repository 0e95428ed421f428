"""No side effects on the caller's model: export_onnx and report leave every submodule's training flag as it was
(a fine-tuning model with frozen BatchNorms stays frozen); bad arguments raise typed errors."""

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx.backends import onnx_export
from sparsifx.errors import BackendError, SparsifxError, TraceError
from sparsifx.module_utils import preserve_training_flags


class FineTune(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.drop, self.head = nn.Dropout(0.1), nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(x.mean((2, 3))))


def frozen_bn_model() -> nn.Module:
    """Training mode with its BatchNorms frozen (eval), as when fine-tuning a pretrained backbone."""
    torch.manual_seed(0)
    model = FineTune().train()
    model.bn1.eval()
    model.bn2.eval()
    return model


def flags(module: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


X = torch.randn(2, 3, 8, 8)


def test_export_onnx_keeps_every_training_flag(tmp_path):
    model = frozen_bn_model()
    before = flags(model)
    assert before[""] and not before["bn1"] and not before["bn2"]
    onnx_export.export_onnx(model, tmp_path / "m.onnx", (X,))
    assert flags(model) == before


def test_failed_export_keeps_every_training_flag(tmp_path, monkeypatch):
    def broken(module, inputs, path, dynamic_batch, opset, n_out):
        raise RuntimeError("unsupported op")

    monkeypatch.setitem(onnx_export.EXPORTERS._items, "broken", broken)
    model = frozen_bn_model()
    before = flags(model)
    with pytest.raises(BackendError, match="unsupported op"):
        onnx_export.export_onnx(model, tmp_path / "m.onnx", (X,), exporter="broken")
    assert flags(model) == before


def test_report_keeps_every_training_flag():
    model = frozen_bn_model()
    gm = sparsifx.trace(model)
    before, gm_before = flags(model), flags(gm)
    assert not gm_before["bn1"] and gm_before["conv1"]  # the traced copy is frozen the same way
    rep = sparsifx.report(gm, (X,))  # a GraphModule gets shapes recorded in place (an eval run)
    assert rep.total_macs
    assert flags(gm) == gm_before
    sparsifx.report(model, (X,))
    assert flags(model) == before


def test_preserve_training_flags_restores_after_an_exception():
    model = frozen_bn_model()
    before = flags(model)
    with pytest.raises(KeyboardInterrupt):
        with preserve_training_flags(model):
            model.eval()
            raise KeyboardInterrupt
    assert flags(model) == before
    with preserve_training_flags(model):
        model.train()  # train() would unfreeze the BatchNorms; the block's end freezes them again
    assert flags(model) == before


def test_report_of_a_non_module_is_a_typed_error():
    with pytest.raises(TraceError, match="needs a torch.nn.Module, got str"):
        sparsifx.report("x")


@pytest.mark.parametrize("bad", [torch.randn(2, 5, 8, 8), torch.randn(8, 8), (X, X)])
def test_export_with_wrong_shaped_input_is_a_backend_error(tmp_path, bad):
    with pytest.raises(BackendError, match="fails on the example inputs"):
        onnx_export.export_onnx(frozen_bn_model(), tmp_path / "m.onnx", bad, verify=True)
    assert list(tmp_path.iterdir()) == []


def test_errors_are_sparsifx_errors():
    assert issubclass(BackendError, SparsifxError) and issubclass(TraceError, SparsifxError)
