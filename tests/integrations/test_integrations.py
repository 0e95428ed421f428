"""sparsifx.integrations: the HF Trainer and Lightning callbacks drive the same controller as ``sparsifx.attach``.

The framework tests train a RigL MLP under the framework and under a plain loop with ``sparsifx.attach`` on the
same batches, and require identical masks and weights (RigL regrows from the gradients of the step it replaces,
so a controller that ran before Lightning's closure, or on accelerate's wrapper, would differ).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx import PreconditionError, SparsifxError
from sparsifx.integrations import MissingExtraError, attach_controller, find_controller, plan, torch_optimizer

EXAMPLES = Path(__file__).parents[2] / "examples"
STEPS, BATCH, LR = 6, 16, 0.1


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    return sparsifx.sparsify(
        net, {"stages": [{"pass": "rigl", "sparsity": 0.7, "delta_t": 2}]}, example_inputs=(torch.randn(2, 8),)
    )


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 8, generator=gen), torch.randint(0, 4, (BATCH,), generator=gen)) for _ in range(n)]


def _plain_loop(batches) -> nn.Module:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    sparsifx.attach(net, opt, steps_per_epoch=len(batches), epochs=1)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def _assert_same_training(got: nn.Module, want: nn.Module) -> None:
    ctrl, ref = sparsifx.passes.training.controller(got), sparsifx.passes.training.controller(want)
    assert ctrl.step == ref.step == STEPS
    assert [h["step"] for h in ctrl.history] == [h["step"] for h in ref.history] and ref.history  # RigL updated
    for name in ref.names:
        assert torch.equal(ctrl.layers[name].mask, ref.layers[name].mask), name
    torch.testing.assert_close(dict(got.named_parameters()), dict(want.named_parameters()))


def _changed_masks(net: nn.Module) -> bool:
    fresh = sparsifx.passes.training.controller(_net())
    ctrl = sparsifx.passes.training.controller(net)
    return any(not torch.equal(ctrl.layers[n].mask, fresh.layers[n].mask) for n in ctrl.names)


# --- framework-free parts -----------------------------------------------------------------------------------------
def test_closure_step_matches_plain_loop():
    """optimizer.step(closure), as Lightning calls it: the closure runs before the controller's pre-hook."""
    batches = _batches()
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    attach_controller(nn.ModuleDict({"wrapped": net}), opt, steps_per_epoch=STEPS, epochs=1)
    for x, y in batches:

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        assert isinstance(opt.step(closure), torch.Tensor)
    reference = _plain_loop(batches)
    _assert_same_training(net, reference)
    assert _changed_masks(reference)


def test_torch_optimizer_unwraps_wrappers():
    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)

    class Accelerated(torch.optim.Optimizer):  # like accelerate's AcceleratedOptimizer: an Optimizer wrapping one
        def __init__(self, optimizer):
            self.optimizer = optimizer

    class LightningLike:
        def __init__(self, optimizer):
            self._optimizer = optimizer

    assert torch_optimizer(inner) is inner
    assert torch_optimizer(Accelerated(inner)) is inner
    assert torch_optimizer(LightningLike(Accelerated(inner))) is inner
    with pytest.raises(PreconditionError, match="torch.optim.Optimizer"):
        torch_optimizer(object())


def test_find_controller_and_refusals():
    net = _net()
    assert find_controller(nn.Sequential(net)) is sparsifx.passes.training.controller(net)
    with pytest.raises(SparsifxError, match="no sparse controller"):
        find_controller(nn.Linear(2, 2))
    with pytest.raises(PreconditionError, match="several sparsified submodules"):
        find_controller(nn.ModuleList([net, _net()]))
    with pytest.raises(PreconditionError, match="LBFGS"):
        attach_controller(net, torch.optim.LBFGS(net.parameters()))


def test_plan_steps_and_epochs():
    assert plan(None, None, 10, 25) == (10, 3)  # the last epoch partial
    assert plan(None, None, 10, 4) == (4, 1)  # max_steps inside the first epoch: the schedule spans 4 steps
    assert plan(None, None, None, 4) == (None, None)
    assert plan(None, None, 10, float("inf")) == (10, None)
    assert plan(5, None, 10, 20) == (5, 4) and plan(None, 7, 10, 20) == (10, 7)


def test_missing_framework_is_a_clear_error(monkeypatch):
    for name, module in (
        ("transformers", "sparsifx.integrations.hf"),
        ("lightning", "sparsifx.integrations.lightning"),
    ):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
        if name == "lightning":
            monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
            monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
        monkeypatch.delitem(sys.modules, module, raising=False)
        with pytest.raises(MissingExtraError, match=r"pip install sparsifx\[(hf|lightning)\]") as info:
            importlib.import_module(module)
        assert isinstance(info.value, ImportError) and isinstance(info.value, SparsifxError)


# --- transformers Trainer -----------------------------------------------------------------------------------------
class _WithLoss(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _Same(torch.utils.data.Dataset):
    """Every item is the same sample, so every batch is the same whatever order Trainer's sampler draws."""

    def __init__(self, x, y, n):
        self.x, self.y, self.n = x, y, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": self.x, "labels": self.y}


def test_hf_trainer_matches_plain_loop(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from sparsifx.integrations.hf import SparsifxCallback

    x, y = _batches(1)[0]
    x, y = x[0], y[0]
    batches = [(x.expand(BATCH, -1), y.expand(BATCH))] * STEPS
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    trainer = Trainer(
        model=_WithLoss(net),
        args=args,
        train_dataset=_Same(x, y, BATCH * (STEPS + 2)),
        optimizers=(opt, sched),
        callbacks=[SparsifxCallback()],
    )
    trainer.train()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SparsifxCallback))
    assert type(callback.attachment.optimizer) is torch.optim.SGD  # the optimizer inside AcceleratedOptimizer
    assert (callback.attachment.steps_per_epoch, callback.attachment.epochs) == (STEPS, 1)
    _assert_same_training(net, _plain_loop(batches))


# --- Lightning ----------------------------------------------------------------------------------------------------
def test_lightning_matches_plain_loop():
    L = pytest.importorskip("lightning")
    from sparsifx.integrations.lightning import SparsifxCallback

    class Module(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    batches = _batches(STEPS + 2)
    data = torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)  # the same batches, in order
    net = _net()
    callback = SparsifxCallback()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(Module(net), loader)
    assert (callback.attachment.steps_per_epoch, callback.attachment.epochs) == (STEPS, 1)
    _assert_same_training(net, _plain_loop(batches[:STEPS]))


# --- the examples -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script,needs",
    [("finetune_hf_trainer.py", ("transformers", "accelerate")), ("finetune_lightning.py", ("lightning",))],
)
def test_example_trains_and_exports(script, needs, tmp_path):
    for module in needs:
        pytest.importorskip(module)
    env = {**os.environ, "SPARSIFX_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--steps", "4", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 4 steps" in proc.stdout and "RigL updates" in proc.stdout
    onnx_files = list(tmp_path.glob("*.onnx"))
    assert len(onnx_files) == 1 and onnx_files[0].stat().st_size > 0
