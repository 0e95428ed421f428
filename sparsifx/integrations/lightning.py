"""``SparsifxCallback``: sparse training under a Lightning ``Trainer``.

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = sparsifx.sparsify(net, {"stages": [{"pass": "rigl", "sparsity": 0.9}]})
        ...
    L.Trainer(max_epochs=3, callbacks=[SparsifxCallback()]).fit(Module(), loader)

On ``on_train_start`` (optimizers configured) the callback attaches the module's sparse controller to the
LightningModule's torch optimizer (``trainer.optimizers``; ``optimizer_index`` picks one when there are
several). Lightning's automatic optimization calls ``optimizer.step(closure)``, with the forward and backward
inside the closure; ``sparsifx.integrations.attach_controller`` runs that closure before the controller's step
pre-hook, so mask updates see this step's gradients, as in a plain loop. Manual optimization (``opt.step()``
in ``training_step``) works the same way. ``steps_per_epoch`` is ``ceil(num_training_batches /
accumulate_grad_batches)`` and ``epochs`` covers ``trainer.estimated_stepping_batches``
(``sparsifx.integrations.plan``: below one epoch, one epoch of that many steps); pass either to the constructor
to override it.
"""

from __future__ import annotations

import logging
import math

import torch.nn as nn

from sparsifx.errors import PreconditionError

from . import Attachment, MissingExtraError, attach_controller, plan, positive_int, require

try:
    _pl = require("lightning.pytorch", "lightning")
except MissingExtraError:  # the standalone package, if that is what is installed
    try:
        _pl = require("pytorch_lightning", "lightning")
    except MissingExtraError:
        raise MissingExtraError(
            "sparsifx.integrations.lightning needs Lightning, which is not installed; pip install sparsifx[lightning]"
        ) from None

log = logging.getLogger(__name__)


class SparsifxCallback(_pl.Callback):
    """Attaches the sparse controller to the Lightning optimizer when training starts (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module | None = None,
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
        optimizer_index: int | None = None,
    ):
        super().__init__()
        self.module = module
        self.steps_per_epoch = positive_int("steps_per_epoch", steps_per_epoch)
        self.epochs = positive_int("epochs", epochs)
        self.optimizer_index = optimizer_index
        self.attachment: Attachment | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = list(trainer.optimizers)
        if self.optimizer_index is None and len(optimizers) != 1:
            raise PreconditionError(
                f"SparsifxCallback: the LightningModule has {len(optimizers)} optimizers; pass "
                "optimizer_index= to pick the one that steps the sparsified layers"
            )
        try:
            optimizer = optimizers[self.optimizer_index or 0]
        except IndexError:
            raise PreconditionError(
                f"SparsifxCallback: optimizer_index {self.optimizer_index} out of range ({len(optimizers)} optimizers)"
            ) from None
        steps, epochs = plan(self.steps_per_epoch, self.epochs, _steps_per_epoch(trainer), _total_steps(trainer))
        self.attachment = attach_controller(
            self.module if self.module is not None else pl_module, optimizer, steps_per_epoch=steps, epochs=epochs
        )


def _steps_per_epoch(trainer) -> int | None:
    batches = trainer.num_training_batches
    if batches is None or not math.isfinite(batches) or batches <= 0:
        return None
    return max(math.ceil(batches / max(trainer.accumulate_grad_batches, 1)), 1)


def _total_steps(trainer) -> float | None:
    try:
        return trainer.estimated_stepping_batches
    except Exception as exc:  # Lightning raises for unsized loaders in some versions
        log.info("SparsifxCallback: total steps unknown (%s: %s)", type(exc).__name__, exc)
        return None
