"""``SparsifxCallback``: sparse training under a transformers ``Trainer``.

    model = Wrapper(sparsifx.sparsify(net, {"stages": [{"pass": "rigl", "sparsity": 0.9}]}))  # returns {"loss": ...}
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsifxCallback()]).train()

On ``on_train_begin`` (after ``Trainer`` has built its optimizer and accelerate has wrapped it) the callback
attaches the model's sparse controller to the ``torch.optim.Optimizer`` inside accelerate's
``AcceleratedOptimizer``; ``Trainer`` then calls ``optimizer.step()`` once per optimizer step (after gradient
accumulation and clipping), which runs the controller's hooks. ``steps_per_epoch`` is Trainer's own count of
optimizer steps per epoch (``ceil(len(train_dataloader) / gradient_accumulation_steps)``) and ``epochs`` covers
``state.max_steps`` (``sparsifx.integrations.plan``: below one epoch, one epoch of ``max_steps`` steps); pass
either to the constructor to override it. ``module`` names the sparsified submodule when the
trained model holds several.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from . import Attachment, attach_controller, plan, positive_int, require

transformers = require("transformers", "hf")
log = logging.getLogger(__name__)


class SparsifxCallback(transformers.TrainerCallback):
    """Attaches the sparse controller to ``Trainer``'s optimizer when training begins (see the module docstring)."""

    def __init__(self, module: nn.Module | None = None, steps_per_epoch: int | None = None, epochs: int | None = None):
        self.module = module
        self.steps_per_epoch = positive_int("steps_per_epoch", steps_per_epoch)
        self.epochs = positive_int("epochs", epochs)
        self.attachment: Attachment | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        steps, epochs = plan(
            self.steps_per_epoch,
            self.epochs,
            _steps_per_epoch(train_dataloader, args.gradient_accumulation_steps),
            state.max_steps,
        )
        self.attachment = attach_controller(
            self.module if self.module is not None else model, optimizer, steps_per_epoch=steps, epochs=epochs
        )


def _steps_per_epoch(dataloader, accumulation: int) -> int | None:
    """Optimizer steps per epoch as ``Trainer`` counts them, or None for a dataloader without a length."""
    try:
        batches = len(dataloader)
    except TypeError:
        return None
    return max(batches // accumulation + int(batches % accumulation > 0), 1)
