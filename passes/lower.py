"""Pass ``lower``: run each sparse Linear / Conv2d with the fastest execution this machine measured."""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.fx as fx
import torch.nn as nn

from sparsifx import validate
from sparsifx.errors import PreconditionError, RecipeError
from sparsifx.masking import effective_weight
from sparsifx.meta_keys import EXAMPLE_INPUTS, LOWER_SUMMARY, REPORT_EXTRA, REPORT_NOTES
from sparsifx.module_utils import eval_mode, set_submodule
from sparsifx.pass_base import PassBase, PassResult
from sparsifx.registry import register_pass
from sparsifx.selection import LayerSelection

from .fuse_epilogues import fusable_activations
from .lower_stats import executed_macs, model_summary

log = logging.getLogger(__name__)
BACKEND_CHOICES = ("auto", "dense", "csr", "csr_tiled", "dense_ort", "direct")


def _forced_conv(backend: str, conv: nn.Conv2d, weight: torch.Tensor) -> nn.Module:
    """The lowered module of a convolution whose backend the recipe names (other kernels: im2col form)."""
    from sparsifx.backends.ort_conv import OrtConv2d
    from sparsifx.backends.sparse_conv import DirectSparseConv2d
    from sparsifx.backends.sparse_modules import SparseConv2d

    table = {"dense": _dense_copy, "direct": DirectSparseConv2d, "dense_ort": OrtConv2d}
    return table[backend](conv, weight) if backend in table else SparseConv2d(conv, weight, backend)


CONV_TIMING_REPS = 7
# how much faster than the whole dense model in onnxruntime the lowered model must be measured to be kept: this VM's
# speed changes from minute to minute and the sparse kernels lose more than onnxruntime in its slow state. The
# shifts measured between states: resnet50 90% 2.85 -> 2.50x (1.14), the BERT-style MLP at 80% batch 16 1.13x when
# lowered, 0.93x an hour later (1.21); 1.1 let that cell end under onnxruntime
# (benchmarks/results/sparse_end_to_end.md)
WHOLE_MODEL_MARGIN = 1.2


def _example_inputs(gm: fx.GraphModule) -> tuple | None:
    """The inputs ``gm`` was traced with, as a tuple (None when there are none)."""
    inputs = gm.meta.get(EXAMPLE_INPUTS)
    return None if inputs is None else tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _dense_copy(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` computing with ``weight`` (the mask baked in)."""
    if isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    else:
        new = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
        )
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
    ``cache_dir`` (calibration cache), ``recalibrate``, ``measure`` (time each lowered Linear on its example
    input shape and the whole model before and after, and report the measured speedups), ``fuse`` (run
    ``fuse_epilogues`` afterwards: residual adds and ReLUs folded into the sparse convolutions; default on),
    ``whole_model`` (default on, where every layer's backend is ``auto``: time the lowered model against the whole
    dense model run by onnxruntime on the example inputs and keep the lowered one only if ``whole_model_margin``
    (1.2) times faster, ``passes/lower_whole_model.py``), ``micro_batch`` (``auto``, the default where every
    layer's backend is ``auto`` and the example batch is larger than 1: also plan copies of the model for chunks of
    one sample and of one sample per thread and keep the fastest of them and the whole batch, where its outputs
    match; a number: always run in chunks of that size; ``false``: off; ``passes/lower_micro_batch.py``).
    ``fuse_blocks`` (default on, with ``fuse``): inverted residual blocks (``1x1 -> depthwise -> 1x1 (+ x)``, the
    MobileNetV2 block) whose three layers are ``auto`` are timed as one fused sparse kernel that keeps the expanded
    activation in cache (``backends/sparse_block.py``) and run that way where it beats the three lowered layers
    (``passes/lower_blocks.py``).
    Convolutions are planned by measurement: torch's dense convolution and the direct sparse convolution
    (``backends/cpp_kernel.py``) are timed on the layer's recorded input shape, each with the ReLU / ReLU6 that
    follows it (fused by the direct kernel), and the faster one is kept (``min_speedup`` applies to predictions). Each
    layer reports ``flop_speedup`` (dense over executed multiply-adds, the theoretical
    figure) beside ``measured_speedup``; ``report_extra["lower"]`` sums them for the model. Dense choices bake the
    mask into a plain layer.
    """

    in_place = True
    preserves_semantics = True
    uses_analyses = ("shapes",)  # input shapes of conv layers (provided from the example inputs when given)
    layer_params = ("backend",)

    def __init__(
        self,
        *,
        backend: str = "auto",
        kernels: list | None = None,
        batch_size: int | None = None,
        min_speedup: float = 1.1,
        cache_dir: str | None = None,
        recalibrate: bool = False,
        measure: bool = False,
        fuse: bool = True,
        whole_model: bool = True,
        whole_model_margin: float = WHOLE_MODEL_MARGIN,
        micro_batch: str | int | bool = "auto",
        fuse_blocks: bool = True,
        selection: LayerSelection | None = None,
    ):
        from sparsifx.backends.sparse_kernels import SPARSE_KERNELS

        self.backend = validate.choice("backend", backend, BACKEND_CHOICES)
        names = SPARSE_KERNELS.names()
        self.kernels = tuple(
            validate.choice("kernels", k, names)
            for k in validate.string_list("kernels", kernels if kernels is not None else names)
        )
        self.batch_size = None if batch_size is None else validate.integer("batch_size", batch_size, 1)
        self.min_speedup = validate.number("min_speedup", min_speedup, 0, lo_open=True)
        self.cache_dir = None if cache_dir is None else validate.string_list("cache_dir", cache_dir)[0]
        self.recalibrate = validate.boolean("recalibrate", recalibrate)
        self.measure = validate.boolean("measure", measure)
        self.fuse = validate.boolean("fuse", fuse)
        self.whole_model = validate.boolean("whole_model", whole_model)
        self.fuse_blocks = validate.boolean("fuse_blocks", fuse_blocks)
        self.whole_model_margin = validate.number("whole_model_margin", whole_model_margin, 0, lo_open=True)
        if micro_batch is False or micro_batch is None:
            self.micro_batch = None
        elif micro_batch == "auto":
            self.micro_batch = "auto"
        else:
            self.micro_batch = validate.integer("micro_batch", micro_batch, 1)
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
        return [
            k
            for k in names
            if k in cal.linear
            and SPARSE_KERNELS.get(k).available()
            and (not conv or SPARSE_KERNELS.get(k).supports_conv)
        ]

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

    def plan_conv(
        self, name: str, conv: nn.Conv2d, weight: torch.Tensor, in_shape: tuple[int, ...], activation: str | None = None
    ) -> tuple[nn.Module, dict]:
        """The faster of torch's dense convolution and the direct sparse one, timed on ``in_shape``; with the
        ``activation`` that follows the layer (and that the direct kernel fuses) counted on both sides."""
        from sparsifx.backends.cost_model import median_ms
        from sparsifx.backends.ort_conv import OrtConv2d
        from sparsifx.backends.ort_conv import supported as ort_supported
        from sparsifx.backends.sparse_conv import ACTIVATIONS, DirectSparseConv2d, direct_supported

        dense = _dense_copy(conv, weight).eval()
        lo, hi = ACTIVATIONS[activation]
        candidates = {"dense": (dense, (lambda m, x: m(x).clamp_(lo, hi)) if activation else (lambda m, x: m(x)))}
        if direct_supported(conv) and "direct" in self._conv_kernels():
            candidates["direct"] = (DirectSparseConv2d(conv, weight, activation=activation), lambda m, x: m(x))
        if "dense_ort" in self.kernels and ort_supported(conv):
            candidates["dense_ort"] = (OrtConv2d(conv, weight, activation=activation), lambda m, x: m(x))
        x = torch.randn(in_shape)
        with torch.inference_mode():
            ms = median_ms({k: (lambda m=m, f=f: f(m, x)) for k, (m, f) in candidates.items()}, reps=CONV_TIMING_REPS)
        best = min(ms, key=ms.__getitem__)  # measured, not predicted: the faster one, no margin
        new = candidates[best][0]
        if best != "dense":
            new.activation = None  # fuse_epilogues sets it where the graph allows
        info = {
            "dense_ms": round(ms["dense"], 4),
            "lowered_ms": round(ms[best], 4),
            "measured_speedup": round(ms["dense"] / ms[best], 2),
        }
        return new.train(conv.training), {"backend": best, **info}

    def _conv_kernels(self) -> tuple[str, ...]:
        from sparsifx.backends import cpp_kernel

        return ("direct",) if cpp_kernel.available() else ()

    # ---- the rewrite -------------------------------------------------------------------------------------
    def _input_shapes(self, gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
        nodes = [n for n in gm.graph.nodes if n.op == "call_module"]  # shapes: the declared 'shapes' analysis
        return {
            n.target: tuple(n.args[0].meta["tensor_meta"].shape)
            for n in nodes
            if n.args and isinstance(n.args[0], fx.Node) and "tensor_meta" in n.args[0].meta
        }

    def _lower_one(
        self, name: str, module: nn.Module, backend: str, shape, activation: str | None = None
    ) -> tuple[nn.Module, dict]:
        from sparsifx.backends.sparse_modules import SparseLinear

        weight = effective_weight(module).detach()
        nnz, density = int(weight.count_nonzero()), float(weight.count_nonzero()) / weight.numel()
        info = {"density": round(density, 4)}
        if isinstance(module, nn.Linear):
            plan = ((None, backend),)
            if backend == "auto":
                plan, speedup = self.plan_linear(*weight.shape, nnz)
                info["predicted_speedup"] = round(speedup, 2)
            new = (
                _dense_copy(module, weight)
                if all(k == "dense" for _, k in plan)
                else SparseLinear(weight, module.bias, plan)
            )
            if backend == "auto" and shape is not None and isinstance(new, SparseLinear):
                new, plan, checked = self._check_linear_plan(module, weight, new, plan, shape)
                info.update(checked)
            info["backend"] = " | ".join(
                f"{'<=' + str(b) if b else 'else'}:{k}" if len(plan) > 1 else k for b, k in plan
            )
        else:
            new, conv_info = self._lower_conv(name, module, weight, backend, shape, activation)
            info.update(conv_info)
        if self.measure and shape is not None and "measured_speedup" not in info:
            info["measured_speedup"] = round(self._measure(module, new, shape), 2)
        if shape is not None:
            info.update(executed_macs(module, new, weight, shape))
            info["flop_speedup"] = round(info["dense_macs"] / max(1, info["executed_macs"]), 2)
        return new, info

    def _check_linear_plan(self, module, weight, new, plan, shape):
        """The cost model's sparse choice timed against torch dense on the layer's recorded input (the batch the
        example inputs have); the prediction is kept only if it holds there."""
        from sparsifx.backends.cost_model import median_ms

        dense = _dense_copy(module, weight).eval()
        x = torch.randn(shape)
        with torch.inference_mode():
            ms = median_ms({"dense": lambda: dense(x), "sparse": lambda: new(x)}, reps=CONV_TIMING_REPS)
        info = {
            "dense_ms": round(ms["dense"], 4),
            "lowered_ms": round(min(ms.values()), 4),
            "measured_speedup": round(ms["dense"] / min(ms.values()), 2),
        }
        if ms["dense"] <= ms["sparse"]:
            return dense.train(module.training), ((None, "dense"),), info
        return new, plan, info

    def _lower_conv(
        self, name: str, module: nn.Conv2d, weight: torch.Tensor, backend: str, shape, activation: str | None = None
    ) -> tuple[nn.Module, dict]:
        if backend == "auto":
            if shape is None:
                raise PreconditionError(
                    f"lower needs the input shape of conv layer '{name}': pass "
                    "example_inputs (or run the 'shapes' analysis) first"
                )
            return self.plan_conv(name, module, weight, shape, activation)
        return _forced_conv(backend, module, weight), {"backend": backend}

    @staticmethod
    def _measure(old: nn.Module, new: nn.Module, shape) -> float:
        from sparsifx.backends.cost_model import median_ms

        x = torch.randn(shape)
        with torch.inference_mode():
            ms = median_ms({"old": lambda: old(x), "new": lambda: new(x)}, reps=CONV_TIMING_REPS)
        return ms["old"] / ms["new"]

    @staticmethod
    def _lower_pools(gm: fx.GraphModule) -> str | None:
        """``nn.MaxPool2d`` -> ``FastMaxPool2d`` (torch's NCHW pooling is slow on one thread), where supported."""
        from sparsifx.backends import cpp_kernel
        from sparsifx.backends.fast_pool import FastMaxPool2d, supported

        if not cpp_kernel.available():
            return None
        names = [name for name, m in gm.named_modules() if supported(m)]
        for name in names:
            old = gm.get_submodule(name)
            set_submodule(gm, name, FastMaxPool2d(old).train(old.training))
        if names:
            gm.recompile()
            return f"lower: {len(names)} MaxPool2d run by the C++ pooling kernel ({', '.join(names[:4])})"
        return None

    @staticmethod
    def _dense_twin(gm: fx.GraphModule, targets) -> fx.GraphModule:
        """A copy of ``gm`` with every target layer a plain dense layer (the mask baked in): the reference."""
        twin = copy.deepcopy(gm)
        for name, module, _ in targets:
            set_submodule(twin, name, _dense_copy(module, effective_weight(module).detach()))
        twin.recompile()
        return twin.eval()

    @staticmethod
    def _measure_model(twin: fx.GraphModule, gm: fx.GraphModule) -> dict:
        """The whole model timed against its dense twin on the example inputs (interleaved medians)."""
        from sparsifx.backends.cost_model import median_ms

        inputs = _example_inputs(gm)
        if inputs is None:
            return {"measured_speedup": None, "measured_note": "no example inputs to time the model on"}
        with eval_mode(gm), torch.inference_mode():
            ms = median_ms({"dense": lambda: twin(*inputs), "lowered": lambda: gm(*inputs)}, reps=CONV_TIMING_REPS)
        return {
            "model_dense_ms": round(ms["dense"], 3),
            "model_lowered_ms": round(ms["lowered"], 3),
            "measured_speedup": round(ms["dense"] / ms["lowered"], 2),
        }

    def _keep_faster(self, gm: fx.GraphModule, twin: fx.GraphModule) -> dict:
        from .lower_whole_model import keep_faster

        outcome = keep_faster(gm, twin, _example_inputs(gm), CONV_TIMING_REPS, self.whole_model_margin)
        if outcome["kept"] == "onnxruntime":
            gm.meta.setdefault(REPORT_NOTES, []).append(
                f"lower: the whole dense model in onnxruntime ({outcome['onnxruntime_ms']} ms) was faster than the "
                f"lowered model ({outcome['lowered_ms']} ms) on the example inputs; onnxruntime runs it"
            )
        return outcome

    def _targets(self, gm: fx.GraphModule) -> list[tuple[str, nn.Module, str]]:
        """``(name, module, backend)`` of every Linear / Conv2d to lower (sparse, masked, forced or a conv)."""
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
            # dense convolutions too: onnxruntime's kernel may beat torch's (a stem with three input channels)
            if is_masked(module) or sparse or backend != "auto" or isinstance(module, nn.Conv2d):
                targets.append((name, module, backend))
        return targets

    def _lower_graph(self, gm: fx.GraphModule, targets) -> tuple[dict[str, dict], bool, str | None]:
        """Lower every target of ``gm`` in place, then fuse epilogues and pools: ``(info per layer, modified,
        note)``."""
        from sparsifx.masking import is_masked

        shapes = self._input_shapes(gm)
        activations = fusable_activations(gm) if self.fuse else {}
        blocks = self._blocks(gm, targets)  # found on the graph as it is, before its layers change
        infos, modified, note = {}, False, None
        for name, module, backend in targets:
            new, infos[name] = self._lower_one(name, module, backend, shapes.get(name), activations.get(name))
            log.info("lower %s: %s", name, infos[name])
            if type(new) is type(module) and not is_masked(module):
                continue  # a plain layer that stays dense: nothing to rewrite
            new.train(module.training)
            set_submodule(gm, name, new)
            modified = True
        if modified:
            gm.recompile()
        if blocks:
            modified |= self._fuse_blocks(gm, blocks, targets, infos, shapes)
        if modified and self.fuse:
            from .fuse_epilogues import FuseEpilogues

            FuseEpilogues()(gm)
            note = self._lower_pools(gm)
        return infos, modified, note

    def _blocks(self, gm: fx.GraphModule, targets) -> list:
        """The inverted residual blocks ``lower`` may fuse: all three layers lowered with backend ``auto``."""
        from sparsifx.backends import cpp_kernel

        from .lower_blocks import find_blocks

        if not (self.fuse and self.fuse_blocks and cpp_kernel.available()):
            return []
        auto = {name for name, _, backend in targets if backend == "auto"}
        return [m for m in find_blocks(gm) if set(m.convs) <= auto]

    def _fuse_blocks(self, gm: fx.GraphModule, blocks, targets, infos: dict, shapes: dict) -> bool:
        """Each block fused where measured faster than its lowered layers; the first layer's report row says what
        was decided (``fused_block``), the three rows of a fused block name it (``block``)."""
        from .lower_blocks import plan_block

        originals = {name: module for name, module, _ in targets}
        weights = {name: effective_weight(originals[name]).detach() for match in blocks for name in match.convs}
        fused = False
        for match in blocks:
            outcome = plan_block(gm, match, originals, weights, infos, shapes.get(match.convs[0]), CONV_TIMING_REPS)
            if outcome is not None:
                infos[match.convs[0]]["fused_block"] = outcome
                fused |= outcome["kept"] == "block"
                log.info("lower block %s: %s", match.convs, outcome)
        return fused

    def _chunk_copies(self, gm: fx.GraphModule, all_auto: bool) -> tuple[dict[int, fx.GraphModule], str | None]:
        """``({chunk size: copy of gm to plan at that size}, None)``, or ``({}, why not)`` (``micro_batch``: auto
        tries one sample and one per thread, a number that size only)."""
        from .lower_micro_batch import auto_sizes, chunk_copy, skip_reason

        if self.micro_batch is None or (self.micro_batch == "auto" and not all_auto):
            return {}, None
        sizes = auto_sizes(torch.get_num_threads()) if self.micro_batch == "auto" else (self.micro_batch,)
        inputs = _example_inputs(gm)
        reasons = {size: skip_reason(gm, inputs, size) for size in sizes}
        if self.micro_batch != "auto" and reasons[self.micro_batch] is not None:
            raise PreconditionError(f"lower: micro_batch {self.micro_batch}: {reasons[self.micro_batch]}")
        copies = {size: chunk_copy(gm, inputs, size) for size, reason in reasons.items() if reason is None}
        return copies, None if copies else reasons[sizes[0]]

    def _keep_chunks(self, gm: fx.GraphModule, bodies: dict[int, fx.GraphModule]) -> dict:
        from .lower_micro_batch import keep_fastest

        force = self.micro_batch != "auto"
        outcome = keep_fastest(gm, bodies, _example_inputs(gm), CONV_TIMING_REPS, force)
        if force and outcome["kept"] != "chunks":
            raise PreconditionError(f"lower: micro_batch {self.micro_batch}: {outcome['skipped']}")
        return outcome

    def call(self, gm: fx.GraphModule) -> PassResult:
        targets = self._targets(gm)
        if not targets:
            return PassResult(gm, False)
        report = gm.meta.setdefault(REPORT_EXTRA, {})
        all_auto = all(backend == "auto" for _, _, backend in targets)
        compare_whole = self.whole_model and all_auto
        twin = self._dense_twin(gm, targets) if self.measure or compare_whole else None
        bodies, chunk_skip = self._chunk_copies(gm, all_auto)  # copied before gm is lowered
        infos, modified, note = self._lower_graph(gm, targets)
        chunks = None
        if bodies and modified:
            body_infos = {size: self._lower_graph(body, self._targets(body))[0] for size, body in bodies.items()}
            chunks = self._keep_chunks(gm, bodies)
            if chunks["kept"] == "chunks":  # the report describes what runs: the layers planned for one chunk
                size = chunks["size"]
                infos = body_infos[size]
                timed = chunks.get(f"chunks_of_{size}_ms")
                gm.meta.setdefault(REPORT_NOTES, []).append(
                    f"lower: the model runs {size} sample(s) at a time (planned at that batch)"
                    + (
                        f": {timed} ms against {chunks['whole_batch_ms']} ms for the whole batch at once"
                        if timed
                        else ""
                    )
                )
        elif chunk_skip is not None:
            chunks = {"kept": "whole batch", "skipped": chunk_skip}
        for name, info in infos.items():
            report.setdefault(name, {}).update(info)
        if note:
            gm.meta.setdefault(REPORT_NOTES, []).append(note)
        summary = model_summary(infos)
        if chunks is not None:
            summary["micro_batch"] = chunks
        if compare_whole and modified:
            summary["whole_model"] = self._keep_faster(gm, twin)
        if twin is not None and modified:
            summary.update(self._measure_model(twin, gm))
        gm.meta[LOWER_SUMMARY] = summary
        log.info("lower: %s", summary)
        return PassResult(gm, modified)
