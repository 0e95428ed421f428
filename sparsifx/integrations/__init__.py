"""Sparse training inside the trainers people already use: the controller ``sparsifx.attach`` drives, attached by
a callback when training begins.

- ``sparsifx.integrations.hf.SparsifxCallback``: a transformers ``TrainerCallback`` (``pip install sparsifx[hf]``
  plus ``accelerate``, which ``Trainer`` needs).
- ``sparsifx.integrations.lightning.SparsifxCallback``: a Lightning ``Callback`` (``pip install sparsifx[lightning]``).

Both find the one sparsified submodule of the trained model (the module, or a submodule, whose ``meta`` holds
the ``sparse_controller`` a training pass installed), unwrap the trainer's optimizer down to the
``torch.optim.Optimizer`` that really steps (accelerate's ``AcceleratedOptimizer`` and Lightning's
``LightningOptimizer`` wrap one as ``.optimizer`` / ``._optimizer``) and call ``attach`` on it with
``steps_per_epoch`` and ``epochs`` from the trainer. From then on the optimizer's step hooks do the work, as in
a plain loop.

A closure: Lightning calls ``optimizer.step(closure)`` and the forward/backward runs *inside* ``step``, after the
optimizer's step pre-hooks. The controller's pre-hook (RigL's gradient-based regrowth, which also skips the
step it replaces) must see this step's gradients, so the controller's ``attach`` puts a pre-hook before it that
runs the closure first and hands the optimizer a closure returning that loss (plain loops with a closure get the
same). Optimizers that evaluate the closure several times (``LBFGS``) are refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from sparsifx.errors import PreconditionError, SparsifxError
from sparsifx.meta_keys import SPARSE_CONTROLLER

log = logging.getLogger(__name__)

MAX_WRAPPERS = 8  # optimizer wrappers unwrapped before giving up


class MissingExtraError(SparsifxError, ImportError):
    """An integration's framework is not installed (catchable as ``ImportError`` too)."""


def require(module: str, extra: str):
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"this integration needs {module}, which is not installed ({exc}); pip install sparsifx[{extra}]"
        ) from exc


def find_controller(model: nn.Module) -> Any:
    """The sparse controller of ``model`` or of its one sparsified submodule."""
    from sparsifx.passes.training.dst_controller import controller

    if not isinstance(model, nn.Module):
        raise PreconditionError(f"SparsifxCallback needs the trained torch.nn.Module, got {type(model).__name__}")
    found = {}
    for name, module in model.named_modules():
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict) and meta.get(SPARSE_CONTROLLER) is not None:
            found.setdefault(id(meta[SPARSE_CONTROLLER]), (name or "(the model)", module))
    if not found:
        controller(model)  # raises the standard "no sparse controller" error
    if len(found) > 1:
        names = ", ".join(name for name, _ in found.values())
        raise PreconditionError(
            f"several sparsified submodules ({names}): pass the one to train as SparsifxCallback(module=...)"
        )
    return controller(next(iter(found.values()))[1])


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of a framework's optimizer wrapper (accelerate's
    ``AcceleratedOptimizer`` subclasses ``Optimizer`` but steps the one it wraps, whose hooks are the ones
    that fire)."""
    found, seen = None, optimizer
    for _ in range(MAX_WRAPPERS):
        if isinstance(seen, torch.optim.Optimizer):
            found = seen
        inner = getattr(seen, "optimizer", None)
        inner = inner if inner is not None else getattr(seen, "_optimizer", None)
        if inner is None or inner is seen:
            break
        seen = inner
    if found is None:
        raise PreconditionError(
            f"SparsifxCallback: {type(optimizer).__name__} is not (and does not wrap) a "
            "torch.optim.Optimizer, whose step hooks the sparse controller needs"
        )
    return found


@dataclass
class Attachment:
    """A controller attached by a callback (the controller runs ``optimizer.step(closure)``'s closure first)."""

    controller: Any
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int | None
    epochs: int | None


def attach_controller(
    model: nn.Module, optimizer: Any, steps_per_epoch: int | None = None, epochs: int | None = None
) -> Attachment:
    """Attach ``model``'s sparse controller to the torch optimizer inside ``optimizer`` (see the module docstring)."""
    ctrl = find_controller(model)
    opt = torch_optimizer(optimizer)
    ctrl.attach(opt, steps_per_epoch=steps_per_epoch, epochs=epochs)
    log.info(
        "sparsifx: %s attached to %s (steps_per_epoch=%s, epochs=%s)",
        type(ctrl).__name__,
        type(opt).__name__,
        steps_per_epoch,
        epochs,
    )
    return Attachment(ctrl, opt, steps_per_epoch, epochs)


def epochs_for(total_steps: float | int | None, steps_per_epoch: int | None) -> int | None:
    """Epochs that cover ``total_steps`` optimizer steps (the last one may be partial), or None if unknown."""
    if not steps_per_epoch or total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        return None
    return max(1, math.ceil(total_steps / steps_per_epoch))


def plan(
    steps_per_epoch: int | None, epochs: int | None, loader_steps: int | None, total_steps: float | int | None
) -> tuple[int | None, int | None]:
    """``(steps_per_epoch, epochs)`` for ``attach``: the user's values where given, else the trainer's. When
    training stops inside the first epoch (``max_steps`` below one epoch) the controller is told one epoch of
    ``max_steps`` steps, so that schedules (RigL's ``end_fraction``, GMP) span the steps that really run; past
    one epoch the last epoch may be partial and the schedule spans whole epochs."""
    spe = steps_per_epoch or loader_steps
    if epochs is not None:
        return spe, epochs
    finite = total_steps is not None and math.isfinite(total_steps) and total_steps > 0
    if steps_per_epoch is None and spe and finite and total_steps < spe:
        return int(total_steps), 1
    return spe, epochs_for(total_steps, spe)


def positive_int(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise PreconditionError(f"SparsifxCallback: {name} must be a positive integer or None, got {value!r}")
    return value
