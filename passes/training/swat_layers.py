"""SWAT layers (``SWATLinear``, ``SWATConv1d/2d/3d``) and memory-lean ``LeanReLU`` / ``LeanMaxPool2d``.

A SWAT layer is a subclass of its dense class (``isinstance(m, nn.Conv2d)`` holds), a tracing leaf,
and keeps the dense ``weight``/``bias`` parameters the optimizer updates. Its state:

* ``sparsity`` (float, changed by the SWAT-M controller), ``swat`` (frozen ``SWATLayerConfig``);
* buffers ``thr_w`` / ``thr_a`` (last weight / activation thresholds, NaN before the first) and
  ``step`` (training forwards seen). Thresholds are recomputed when ``every_call`` (Linear, §1.2),
  ``step < warmup_steps`` or ``step % period == 0``; otherwise the stored (stale) ones are reused.
  Departure: the reference counts the batch index *within the epoch*; we count training calls since
  the pass ran (no epoch notion in a layer); with ``period`` dividing the epoch length they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.module_utils import swap_class
from sparsifx.tracing import register_leaf_type

from . import topk
from .kernels import ops_for
from .swat_ops import ConvOp, LeanMaxPoolFunction, LeanReLUFunction, LinearOp, SWATFunction, WeightMask, pack_bits


@dataclass(frozen=True)
class SWATLayerConfig:
    structured: bool = False  # kernel-level (out, in) L1 selection of weights, recomputed every step
    exact: bool = False  # index-based Top-K (exactly k) on recompute steps instead of thresholds
    period: int = 1  # threshold recompute period in training steps
    warmup_steps: int = 0  # steps with exact per-step Top-K before reuse starts
    every_call: bool = False  # Linear: recompute both thresholds on every call (reference custom_linear.py)


class SWATMixin:
    """Top-K weights in forward and input grad, Top-K activations for the weight grad."""

    swat: SWATLayerConfig
    sparsity: float

    def _init_swat(self, sparsity: float, config: SWATLayerConfig) -> None:
        self.sparsity = float(sparsity)
        self.swat = config
        dev = self.weight.device
        self.register_buffer("thr_w", torch.tensor(float("nan"), device=dev))
        self.register_buffer("thr_a", torch.tensor(float("nan"), device=dev))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # -- thresholds ------------------------------------------------------------------------------------------
    def _recompute(self) -> bool:
        c, step = self.swat, int(self.step)
        return c.every_call or step < c.warmup_steps or step % c.period == 0 or bool(torch.isnan(self.thr_w))

    def keep_weights(self) -> int:
        shape = self.weight.shape
        units = shape[0] * shape[1] if self.swat.structured else self.weight.numel()
        return topk.keep_count(units, self.sparsity)

    def weight_mask(self, recompute: bool, store: bool = True) -> tuple[torch.Tensor, WeightMask]:
        """``(W_s, mask)``: the forward weight and its mask in the cheapest exact encoding for backward.
        Recomputed, or from the stored threshold (structured: always recomputed)."""
        w = self.weight.detach()
        if self.swat.structured:
            kernels, _ = topk.threshold_mask(topk.kernel_scores(w), self.keep_weights())
            wmask = WeightMask("kernel", kernels)
            return wmask.apply(w), wmask
        if not recompute:
            wmask = WeightMask("threshold", float(self.thr_w))
            return wmask.apply(w), wmask
        if self.swat.exact:
            mask, thr = topk.exact_mask(w.abs(), self.keep_weights())
            wmask = WeightMask("bits", pack_bits(mask))
            w_s = ops_for(w).apply_mask(w, mask)
        else:
            thr = topk.abs_kth_largest(w, self.keep_weights())
            wmask = WeightMask("threshold", thr)
            w_s = wmask.apply(w)
        if store:
            self.thr_w.fill_(thr)
        return w_s, wmask

    def _activation_mask(self, recompute: bool):
        def select(x: torch.Tensor) -> torch.Tensor:
            k = topk.keep_count(x.numel(), self.sparsity)
            tiny = torch.finfo(x.dtype).tiny  # zeros add nothing to the weight gradient: never stored
            if recompute and self.swat.exact:
                mask, thr = topk.exact_mask(x.detach().abs(), k)
                self.thr_a.fill_(thr)
                return mask & (x.detach() != 0)
            if recompute:
                mask, thr = topk.abs_topk_mask(x, k, floor=tiny)
                self.thr_a.fill_(thr)
                return mask
            return ops_for(x).abs_ge(x, max(float(self.thr_a), tiny))

        return select

    # -- forward ---------------------------------------------------------------------------------------------
    def swat_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        if not training:  # eval: same sparsified forward, stale thresholds kept, state untouched
            have = not bool(torch.isnan(self.thr_w)) and not self.swat.every_call
            w_s, _ = self.weight_mask(recompute=not have, store=False)
            return op.forward(x, w_s, self.bias)
        recompute = self._recompute()
        w_s, wmask = self.weight_mask(recompute)
        act = self._activation_mask(recompute)
        self.step += 1
        return SWATFunction.apply(x, self.weight, self.bias, w_s, wmask, act, op)

    def effective_weight(self) -> torch.Tensor:
        """The weight the next forward computes with (without advancing the state)."""
        have = not bool(torch.isnan(self.thr_w)) and not self.swat.every_call
        return self.weight_mask(recompute=not have, store=False)[0]

    def training_densities(self) -> tuple[float, float, float]:
        """(forward W, backward input-grad W, backward weight-grad activation) densities for FLOP counts."""
        d = 1.0 - self.sparsity
        return d, d, d

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, swat_sparsity={self.sparsity:.4f}, {self.swat}"


@register_leaf_type
class SWATLinear(SWATMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swat_forward(x, LinearOp())


class _SWATConv(SWATMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if isinstance(padding, str) or self.padding_mode != "zeros":  # pad explicitly, then convolve unpadded
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * len(self.kernel_size)
        return self.swat_forward(x, ConvOp(tuple(self.stride), tuple(padding), tuple(self.dilation), self.groups))


@register_leaf_type
class SWATConv1d(_SWATConv, nn.Conv1d):
    pass


@register_leaf_type
class SWATConv2d(_SWATConv, nn.Conv2d):
    pass


@register_leaf_type
class SWATConv3d(_SWATConv, nn.Conv3d):
    pass


# dense class -> SWAT class: the one table to extend for a new layer type
SWAT_TYPES: dict[type, type] = {
    nn.Linear: SWATLinear,
    nn.Conv1d: SWATConv1d,
    nn.Conv2d: SWATConv2d,
    nn.Conv3d: SWATConv3d,
}
SWAT_DENSE_TYPES: dict[type, type] = {v: k for k, v in SWAT_TYPES.items()}


def is_swat(module: nn.Module) -> bool:
    return isinstance(module, SWATMixin)


def swat_layers(root: nn.Module):
    """(qualified name, SWAT layer) pairs of ``root`` in ``named_modules`` order."""
    for name, module in root.named_modules():
        if is_swat(module):
            yield name, module


# ---------------------------------------------------------------------------------------------------------------
def lean_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``relu(x)`` whose backward keeps 1 bit per element (exactly the same values and gradients)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return LeanReLUFunction.apply(x, inplace)
    return torch.relu_(x) if inplace else torch.relu(x)


@register_leaf_type
class LeanReLU(nn.ReLU):
    """Drop-in ``nn.ReLU`` saving a packed sign bitmask instead of its dense output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lean_relu(x, self.inplace)


@register_leaf_type
class LeanMaxPool2d(nn.MaxPool2d):
    """Drop-in ``nn.MaxPool2d`` (``return_indices=False``) saving int32 indices only for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)

        def pair(v):
            return [v, v] if isinstance(v, int) else list(v)

        stride = pair(self.stride if self.stride is not None else self.kernel_size)
        return LeanMaxPoolFunction.apply(
            x, pair(self.kernel_size), stride, pair(self.padding), pair(self.dilation), self.ceil_mode
        )


__all__ = [
    "SWATLayerConfig",
    "SWATLinear",
    "SWATConv1d",
    "SWATConv2d",
    "SWATConv3d",
    "SWAT_TYPES",
    "is_swat",
    "swat_layers",
    "lean_relu",
    "LeanReLU",
    "LeanMaxPool2d",
    "swap_class",
]
