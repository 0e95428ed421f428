"""``SparseController``: updates the masks of a DST-sparsified model while a plain training loop runs.

Two added lines make a PyTorch loop sparse-train::

    model = sparsifx.sparsify(net, {"stages": [{"pass": "rigl", "sparsity": 0.9}]})
    sparsifx.attach(model, optimizer, steps_per_epoch=len(loader), epochs=epochs)

``attach`` registers an optimizer step pre-hook and post-hook, so the user keeps calling
``optimizer.step()``. Before step ``t`` the method may update the masks instead of stepping (RigL): the
step is then skipped by hiding every gradient from the optimizer for that one call (torch optimizers
skip parameters whose ``grad`` is None), and the gradients are restored afterwards. After each step
``W ← W ⊙ M`` is re-applied, FLOPs are charged, GMP-style per-step updates and per-epoch updates (epoch
``e`` ends after step ``e·steps_per_epoch``; none after the last epoch) run, and ``dense_grad`` is set
on the masked layers for the next step's forward.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.nn as nn

from sparsifx.errors import PreconditionError, SparsifxError
from sparsifx.meta_keys import SPARSE_CONTROLLER
from sparsifx.sparse_linear import SPARSE_INDEX_BUFFERS, is_sparse_storage

from .distributed import sync_layers
from .flops import FlopCounter, macs_rule
from .mask_ops import remap_slots, seeded_generator, swap_param, zero_slots
from .neuron_pruning import maybe_prune

log = logging.getLogger(__name__)


class SparseController:
    """Owns the training-time state of one DST method on one model (see the module docstring)."""

    def __init__(self, gm: nn.Module, method, names: Iterable[str], target_sparsity: dict[str, float] | None = None):
        self.gm = gm
        self.method = method
        self.names = list(names)
        self.target_sparsity = dict(target_sparsity or {})
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_per_epoch: int | None = None
        self.epochs: int | None = None
        self.data = None
        self.state: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.flops = FlopCounter()
        self._handles: list = []
        self._module_handles: list = []
        self._hidden: list | None = None

    # --- views ------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, nn.Module]:
        return {n: self.gm.get_submodule(n) for n in self.names}

    def density(self, name: str) -> float:
        module = self.gm.get_submodule(name)
        if is_sparse_storage(module):
            return module.density()
        return float(module.mask.count_nonzero()) / module.mask.numel()

    def masks(self) -> dict[str, torch.Tensor]:
        """Dense boolean-valued masks per layer (a sparse-storage layer's is built here: dense-sized)."""
        return {n: _pattern(m) for n, m in self.layers.items()}

    def nnz(self) -> dict[str, int]:
        return {n: m.nnz if is_sparse_storage(m) else int(m.mask.count_nonzero()) for n, m in self.layers.items()}

    def sparse_names(self) -> list[str]:
        """Controlled layers held in sparse storage (``SparseLinear``)."""
        return [n for n, m in self.layers.items() if is_sparse_storage(m)]

    @property
    def total_steps(self) -> int | None:
        if self.steps_per_epoch and self.epochs:
            return self.steps_per_epoch * self.epochs
        return None

    def generator(self, *salt: Any) -> torch.Generator:
        """A generator seeded from (mask seed, step, salt): identical on every rank."""
        return seeded_generator(self.method.mask.seed, self.step, *map(str, salt))

    # --- attaching --------------------------------------------------------------------------------------------
    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int | None = None,
        epochs: int | None = None,
        data: Iterable | None = None,
    ) -> "SparseController":
        """Hook ``optimizer`` (its ``step()`` now drives the mask updates); returns ``self``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise PreconditionError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for key, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PreconditionError(f"attach: {key} must be a positive integer, got {value!r}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise PreconditionError(
                "LBFGS evaluates its closure several times per step; the sparse controller's "
                "updates need one forward/backward per step: use another optimizer"
            )
        self.detach()
        self.optimizer, self.steps_per_epoch, self.epochs, self.data = optimizer, steps_per_epoch, epochs, data
        self.method.check_attach(self)
        self._handles = [
            optimizer.register_step_pre_hook(closure_first),  # before our own pre-hook
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        for name, module in self.gm.named_modules():
            if name and macs_rule(module) is not None:
                self._module_handles.append(module.register_forward_hook(self._flop_hook(name)))
        sync_layers(self.layers.values())
        self._set_dense_grad()
        return self

    def detach(self) -> None:
        """Remove every hook (optimizer and modules); the masks stay."""
        self.release_modules()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def release_modules(self) -> None:
        """Remove the module hooks (FLOP counting, CTRE statistics) so that the model can be saved as data.
        Runs by itself after the last step when ``attach`` got ``steps_per_epoch`` and ``epochs``; the
        optimizer hooks stay (further steps keep ``W ⊙ M``)."""
        for handle in self._module_handles:
            handle.remove()
        self._module_handles = []
        self.method.on_detach(self)

    def _flop_hook(self, name: str):
        rule = macs_rule(self.gm.get_submodule(name))
        masked = name in self.names

        def hook(module, inputs, output):
            if self.flops.extra_mode or (module.training and torch.is_grad_enabled()):
                self.flops.record(name, float(rule(module, output)), self.density(name) if masked else 1.0)

        return hook

    # --- the optimizer hooks ----------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _pre_hook(self, optimizer, args, kwargs):
        if self.method.before_step(self, self.step):
            self._hidden = [(p, p.grad) for p in self._params()]
            for p, _ in self._hidden:
                p.grad = None
            sync_layers(self.layers.values())
        return None

    def _post_hook(self, optimizer, args, kwargs) -> None:
        if self._hidden is not None:
            for p, grad in self._hidden:
                p.grad = grad
            self._hidden = None
        t = self.step
        self.apply_masks()
        self.flops.charge_step({n: self._step_densities(n, t) for n in self.names})
        for name in self.sparse_names():
            self.gm.get_submodule(name).probe.clear()
        self.step += 1
        updates = len(self.history)
        self.method.after_step(self, t)
        if self.steps_per_epoch and self.step % self.steps_per_epoch == 0:
            epoch = self.step // self.steps_per_epoch
            if self.epochs is None or epoch < self.epochs:
                maybe_prune(self, epoch)  # hidden-neuron importance pruning runs before the method's update
                self.method.on_epoch_end(self, epoch)
        if len(self.history) != updates:
            sync_layers(self.layers.values())
        self._set_dense_grad()
        if self.total_steps is not None and self.step >= self.total_steps:
            log.info("%s: training finished after %d steps; module hooks removed", self.method.label, self.step)
            self.release_modules()

    def _step_densities(self, name: str, t: int) -> tuple[float, float, float]:
        """(density, weight-gradient density, executed multiple of the layer's dense FLOPs) of step ``t``."""
        d, dw = self.density(name), self.method.weight_grad_density(self, name, t)
        if not is_sparse_storage(self.gm.get_submodule(name)):
            return d, dw, 3.0
        return d, dw, 3.0 * d + (1.0 if self.method.dense_grad_at(self, t) else 0.0)

    def _set_dense_grad(self) -> None:
        dense = bool(self.method.dense_grad_at(self, self.step))
        for module in self.layers.values():
            module.dense_grad = dense

    # --- mask edits used by the methods -----------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        """``W ← W ⊙ M`` on every controlled layer."""
        for module in self.layers.values():
            if not is_sparse_storage(module):
                module.weight.mul_(module.mask)

    @torch.no_grad()
    def replace_mask(
        self, name: str, new_mask: torch.Tensor, init=None, reset_slots: bool = True, kind: str = "update"
    ) -> dict[str, int]:
        """Install ``new_mask`` on ``name``: dropped weights -> 0, grown weights -> ``init(weight, grown, generator)``
        (left at 0 when None), optimizer slots of grown positions -> 0 when ``reset_slots``. The history
        record's ``step`` counts the optimizer steps completed when the mask changed."""
        module = self.gm.get_submodule(name)
        old = module.mask.bool()
        new = new_mask.to(old.device).bool()
        grown = new & ~old
        module.weight.mul_(new.to(module.weight.dtype))
        if init is not None and grown.any():
            w = module.weight
            module.weight[grown] = init(
                tuple(w.shape), int(grown.sum()), w.dtype, w.device, self.generator("init", name)
            )
        if reset_slots:
            zero_slots(self.optimizer, module.weight, grown)
        module.mask.copy_(new.to(module.mask.dtype))
        record = {
            "step": self.step,
            "layer": name,
            "kind": kind,
            "dropped": int((old & ~new).sum()),
            "grown": int(grown.sum()),
            "nnz": int(new.sum()),
        }
        self.history.append(record)
        return record

    @torch.no_grad()
    def replace_topology(
        self, name: str, keep: torch.Tensor, grown: torch.Tensor, init=None, revive: bool = True, kind: str = "update"
    ) -> dict[str, int]:
        """Sparse-storage twin of ``replace_mask``: keep the non-zeros where ``keep`` (bool over the current nnz)
        and add the linear positions ``grown`` (none of them kept). With ``revive`` a grown position that was a
        non-zero before this update keeps its value and optimizer slots (RigL: a just-dropped weight may return);
        otherwise it counts as new (SET re-initialises re-drawn positions). New positions get ``init`` (0 when
        None) and zero optimizer slots."""
        module = self.gm.get_submodule(name)
        old_keys = module.keys()
        values = module.values.detach()
        kept_keys = old_keys[keep]
        new_keys, order = torch.sort(torch.cat([kept_keys, grown.to(old_keys.device)]))
        old_index = torch.arange(old_keys.numel(), device=old_keys.device)
        pos = torch.searchsorted(old_keys, new_keys).clamp(max=max(0, old_keys.numel() - 1))
        was = (old_keys[pos] == new_keys) if old_keys.numel() else torch.zeros_like(new_keys, dtype=torch.bool)
        if not revive:
            was &= torch.isin(new_keys, kept_keys)
        source = torch.where(was, old_index[pos] if old_keys.numel() else pos, torch.full_like(pos, -1))
        new_values = torch.zeros(new_keys.numel(), dtype=values.dtype, device=values.device)
        new_values[was] = values[source[was]]
        fresh = ~was
        if init is not None and bool(fresh.any()):
            new_values[fresh] = init(
                module.shape, int(fresh.sum()), values.dtype, values.device, self.generator("init", name)
            )
        remap_slots(self.optimizer, module.values, source)
        grad = module.values.grad
        if grad is not None:  # the gradient follows too (a hidden RigL step restores it afterwards)
            grad = torch.where(was, grad[source.clamp(min=0)], torch.zeros_like(new_values))
            module.values.grad = None
        old_param = module.values
        module.set_topology(new_keys, new_values)
        swap_param(self.optimizer, old_param, module.values)
        module.values.grad = grad
        record = {
            "step": self.step,
            "layer": name,
            "kind": kind,
            "dropped": old_keys.numel() - int(was.sum()),
            "grown": int(fresh.sum()),
            "nnz": new_keys.numel(),
        }
        self.history.append(record)
        return record

    # --- user events ------------------------------------------------------------------------------------------
    def epoch_end(self) -> None:
        """Run the per-epoch update now, for loops that attach without ``steps_per_epoch`` (call it after
        every epoch but the last)."""
        if self.steps_per_epoch:
            raise PreconditionError("epoch ends are automatic when attach() got steps_per_epoch")
        self.state["manual_epochs"] = self.state.get("manual_epochs", 0) + 1
        maybe_prune(self, self.state["manual_epochs"])
        self.method.on_epoch_end(self, self.state["manual_epochs"])
        sync_layers(self.layers.values())

    def observe(self, metric: float) -> None:
        """Report a validation metric (higher is better) at an epoch end; CTRE_seq switches on it."""
        self.state.setdefault("metrics", []).append(float(metric))

    def training_flops(self) -> dict[str, float]:
        return self.flops.summary()

    def state_bytes(self) -> dict[str, int]:
        """Bytes the training state occupies now: parameters, their gradients, the optimizer's state for them, and
        the topology (masks of masked layers, index buffers of sparse-storage layers)."""
        params = list(dict.fromkeys(self.gm.parameters()))
        out = {
            "parameters": sum(_nbytes(p) for p in params),
            "gradients": sum(_nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer_state": 0,
            "topology": 0,
        }
        if self.optimizer is not None:
            out["optimizer_state"] = sum(
                _nbytes(v)
                for p in params
                for v in self.optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor)
            )
        for module in self.layers.values():
            kept = SPARSE_INDEX_BUFFERS if is_sparse_storage(module) else ("mask",)
            out["topology"] += sum(_nbytes(getattr(module, k)) for k in kept)
        out["total"] = sum(out.values())
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method.label,
            "step": self.step,
            "density": {n: self.density(n) for n in self.names},
            "updates": len({(h["step"], h["kind"]) for h in self.history}),
            **self.training_flops(),
            "state_bytes": self.state_bytes(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "state": {k: v for k, v in self.state.items() if not k.startswith("_")},
            "history": list(self.history),
            "flops": {k: getattr(self.flops, k) for k in ("sparse", "dense", "executed", "extra", "steps")},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.state.update(state["state"])
        self.history = list(state.get("history", []))
        for key, value in state.get("flops", {}).items():
            setattr(self.flops, key, value)
        self._set_dense_grad()


def closure_first(optimizer, args, kwargs):
    """Step pre-hook for ``optimizer.step(closure)`` (Lightning, some plain loops): run the closure now (forward,
    backward) and hand the optimizer a closure returning its loss, so that the controller's pre-hook (RigL's update)
    sees this step's gradients."""
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        return None
    with torch.enable_grad():
        loss = closure()

    def evaluated():
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": evaluated}
    return (args[0], evaluated, *args[2:]), kwargs


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pattern(module) -> torch.Tensor:
    if not is_sparse_storage(module):
        return module.mask.detach().clone()
    mask = torch.zeros(module.shape[0] * module.shape[1], device=module.values.device)
    mask[module.keys()] = 1.0
    return mask.view(module.shape)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def controller(model: nn.Module) -> SparseController:
    """The ``SparseController`` a DST pass stored on ``model`` (a GraphModule, or DDP around one)."""
    meta = getattr(_unwrap(model), "meta", None)
    ctrl = meta.get(SPARSE_CONTROLLER) if isinstance(meta, dict) else None
    if ctrl is None:
        raise SparsifxError(
            "model has no sparse controller: sparsify it with a sparse training pass "
            "(static, set, rigl, sparse_momentum, ctre, gmp, swat) first"
        )
    return ctrl


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
    data: Iterable | None = None,
) -> SparseController:
    """Hook ``optimizer`` so that ``optimizer.step()`` also runs ``model``'s mask updates."""
    ctrl = controller(model)
    if isinstance(model, nn.parallel.DistributedDataParallel) and ctrl.method.neuron_pruning is not None:
        raise PreconditionError(
            "neuron_pruning shrinks layers while training, which DistributedDataParallel cannot "
            "follow; train without DDP or drop neuron_pruning from the recipe"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel) and ctrl.sparse_names() and ctrl.method.changes_nnz:
        raise PreconditionError(
            f"{ctrl.method.label} with storage: sparse changes the number of non-zeros, so the "
            "values Parameters change size, which DistributedDataParallel cannot follow; use "
            "storage: masked under DDP, or a constant-nnz method (static, set, rigl)"
        )
    return ctrl.attach(optimizer, steps_per_epoch=steps_per_epoch, epochs=epochs, data=data)
