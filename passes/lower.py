"""Pass ``lower``: run each sparse Linear / Conv2d with the fastest execution this machine measured."""
from __future__ import annotations

import logging
import math
import statistics
import time

import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx import validate
from sparsifx.errors import PreconditionError, RecipeError
from sparsifx.masking import effective_weight
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.module_utils import set_submodule
from sparsifx.selection import LayerSelection
from sparsifx.tracing import record_shapes

log = logging.getLogger(__name__)
BACKEND_CHOICES = ("auto", "dense", "csr", "csr_tiled", "dense_ort")



def _dense_copy(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` computing with ``weight`` (the mask baked in)."""
    if isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    else:
        new = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                        module.dilation, module.groups, module.bias is not None, module.padding_mode)
    new = new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new.train(module.training)


@register_pass("lower")
class Lower(PassBase):
    """``masked_linear(x) -> kernel(x, packed(W * mask))`` per layer, the kernel picked by a calibrated cost model.

    Parameters: ``backend`` (``auto`` or a kernel name; per layer via ``by_name: {fc1: {backend: csr}}``),
    ``kernels`` (candidates for ``auto``), ``batch_size`` (plan for this batch only; default: a plan per
    batch range), ``min_speedup`` (another kernel must be predicted this much faster than torch dense; 1.1),
    ``cache_dir`` (calibration cache), ``recalibrate``, ``measure`` (time each lowered layer on its example
    input shape and report the measured speedup). Dense choices bake the mask into a plain layer.
    """
    preserves_semantics = True
    layer_params = ("backend",)

    def __init__(self, *, backend: str = "auto", kernels: list | None = None, batch_size: int | None = None,
                 min_speedup: float = 1.1, cache_dir: str | None = None, recalibrate: bool = False,
                 measure: bool = False, selection: LayerSelection | None = None):
        from sparsifx.backends.sparse_kernels import SPARSE_KERNELS
        self.backend = validate.choice("backend", backend, BACKEND_CHOICES)
        names = SPARSE_KERNELS.names()
        self.kernels = tuple(validate.choice("kernels", k, names) for k in validate.string_list(
            "kernels", kernels if kernels is not None else names))
        self.batch_size = None if batch_size is None else validate.integer("batch_size", batch_size, 1)
        self.min_speedup = validate.number("min_speedup", min_speedup, 0, lo_open=True)
        self.cache_dir = None if cache_dir is None else validate.string_list("cache_dir", cache_dir)[0]
        self.recalibrate = validate.boolean("recalibrate", recalibrate)
        self.measure = validate.boolean("measure", measure)
        self.selection = (selection or LayerSelection()).with_defaults(("Conv2d", "Linear"))
        self._calibration = None

    # ---- cost model --------------------------------------------------------------------------------------
    def calibration(self):
        if self._calibration is None:
            from sparsifx.backends.cost_model import load_or_calibrate
            self._calibration = load_or_calibrate(self.kernels, self.cache_dir, self.recalibrate)
        return self._calibration

    def _usable(self, conv: bool) -> list[str]:
        from sparsifx.backends.sparse_kernels import SPARSE_KERNELS
        cal = self.calibration()
        names = dict.fromkeys(("dense",) + self.kernels)  # torch dense is always the reference candidate
        return [k for k in names if k in cal.linear and SPARSE_KERNELS.get(k).available()
                and (not conv or SPARSE_KERNELS.get(k).supports_conv)]

    def _best(self, cost: dict[str, float]) -> str:
        """The cheapest kernel among torch dense and those predicted ``min_speedup`` times faster than it."""
        eligible = [k for k in cost if k == "dense" or cost[k] * self.min_speedup <= cost["dense"]]
        return min(eligible, key=cost.__getitem__)

    def plan_linear(self, out_f: int, in_f: int, nnz: int) -> tuple[tuple[tuple[int | None, str], ...], float]:
        """``(plan, predicted speedup vs torch dense at the planned batch or at batch 1)``."""
        cal = self.calibration()
        points = (self.batch_size,) if self.batch_size else cal.batches
        choice, speedups = [], []
        for b in points:
            cost = {k: cal.linear_ms(k, out_f, in_f, nnz, b) for k in self._usable(False)}
            best = self._best(cost)
            choice.append(best)
            speedups.append(cost["dense"] / cost[best])
        bounds = [int(math.sqrt(a * b)) for a, b in zip(points, points[1:])] + [None]
        plan: list[tuple[int | None, str]] = []
        for bound, k in zip(bounds, choice):
            if plan and plan[-1][1] == k:
                plan[-1] = (bound, k)
            else:
                plan.append((bound, k))
        return tuple(plan), speedups[0]

    def plan_conv(self, conv: nn.Conv2d, nnz: int, in_shape: tuple[int, ...]) -> tuple[str, float]:
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return "dense", 1.0
        n, _, h, w = in_shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        cols = n * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        k_dim = conv.in_channels * kh * kw
        unfold = (kh, kw) != (1, 1) or (ph, pw) != (0, 0)
        cal = self.calibration()
        cost = {k: cal.conv_ms(k, conv.out_channels, k_dim, nnz, cols, unfold) for k in self._usable(True)}
        best = self._best(cost)
        return best, cost["dense"] / cost[best]

    # ---- the rewrite -------------------------------------------------------------------------------------
    def _input_shapes(self, gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
        nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
        if any(n.args and "tensor_meta" not in getattr(n.args[0], "meta", {}) for n in nodes):
            inputs = gm.meta.get("example_inputs")
            if inputs is not None:
                record_shapes(gm, inputs)
        return {n.target: tuple(n.args[0].meta["tensor_meta"].shape) for n in nodes
                if n.args and isinstance(n.args[0], fx.Node) and "tensor_meta" in n.args[0].meta}

    def _lower_one(self, name: str, module: nn.Module, backend: str, shape) -> tuple[nn.Module, dict]:
        from sparsifx.backends.sparse_modules import SparseConv2d, SparseLinear
        weight = effective_weight(module).detach()
        nnz, density = int(weight.count_nonzero()), float(weight.count_nonzero()) / weight.numel()
        info = {"density": round(density, 4)}
        if isinstance(module, nn.Linear):
            plan = ((None, backend),)
            if backend == "auto":
                plan, speedup = self.plan_linear(*weight.shape, nnz)
                info["predicted_speedup"] = round(speedup, 2)
            new = _dense_copy(module, weight) if all(k == "dense" for _, k in plan) else \
                SparseLinear(weight, module.bias, plan)
            info["backend"] = " | ".join(f"{'<=' + str(b) if b else 'else'}:{k}" if len(plan) > 1 else k
                                         for b, k in plan)
        else:
            if backend == "auto":
                if shape is None:
                    raise PreconditionError(f"lower needs the input shape of conv layer '{name}': pass "
                                            "example_inputs (or run the 'shapes' analysis) first")
                backend, info["predicted_speedup"] = self.plan_conv(module, nnz, shape)
                info["predicted_speedup"] = round(info["predicted_speedup"], 2)
            new = _dense_copy(module, weight) if backend == "dense" else SparseConv2d(module, weight, backend)
            info["backend"] = backend
        if self.measure and shape is not None:
            info["measured_speedup"] = round(self._measure(module, new, shape), 2)
        return new, info

    @staticmethod
    def _measure(old: nn.Module, new: nn.Module, shape) -> float:
        x = torch.randn(shape)
        times: dict[str, list[float]] = {"old": [], "new": []}
        with torch.inference_mode():
            for _ in range(7):
                for key, mod in (("old", old), ("new", new)):
                    t0 = time.perf_counter()
                    mod(x)
                    times[key].append(time.perf_counter() - t0)
        return statistics.median(times["old"]) / statistics.median(times["new"])

    def call(self, gm: fx.GraphModule) -> PassResult:
        from sparsifx.masking import is_masked
        targets = []
        for name, module in self.selection.layers(gm):
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            backend = self.selection.param(name, module, "backend", self.backend)
            try:
                validate.choice("backend", backend, BACKEND_CHOICES)
            except RecipeError as exc:
                raise exc.at(f"by_name.{name}") from None
            sparse = bool((effective_weight(module) == 0).any())
            if is_masked(module) or sparse or backend != "auto":
                targets.append((name, module, backend))
        if not targets:
            return PassResult(gm, False)
        shapes = self._input_shapes(gm) if any(isinstance(m, nn.Conv2d) for _, m, _ in targets) else {}
        report = gm.meta.setdefault("report_extra", {})
        modified = False
        for name, module, backend in targets:
            new, info = self._lower_one(name, module, backend, shapes.get(name))
            report.setdefault(name, {}).update(info)
            log.info("lower %s: %s", name, info)
            if type(new) is type(module) and not is_masked(module):
                continue  # a plain layer that stays dense: nothing to rewrite
            set_submodule(gm, name, new)
            modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
