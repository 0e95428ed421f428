"""``SparseInvertedResidual``: a MobileNetV2-style block (sparse 1x1 expand, depthwise, sparse 1x1 project, optional
residual) as one C++ call that never writes the expanded activation to memory (``backends/cpp_block.py``).

Run layer by layer, such a block writes the expanded activation (six times the block's channels) and reads it back
twice; at 90% sparsity the 1x1 layers are bound by that traffic, not by their multiply-adds. The fused kernel keeps
a band of expanded rows in the L2 cache instead. ``passes/lower_blocks.py`` finds the blocks in a graph, and
``lower`` keeps the fused form where it is measured faster than the layers it replaces. Inference only; a tracing
leaf.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sparsifx.errors import BackendError
from sparsifx.tracing import register_leaf_type

from . import cpp_kernel
from .sparse_conv import ACTIVATIONS, check_packed, pack
from .transient import TransientState

# bytes of the per-band buffers (expanded rows and their depthwise output): chosen on mobilenet_v2's blocks at 90%
# on this project's 2-core EPYC (Zen 3, 512 KB L2), band heights 1-16 timed: 200-400 KB were within 3% of the best
# at every block size, one row per band up to 1.9x slower
BAND_BYTES = 256 << 10
# at 14x14, bands of 2 rows (28 columns) ran 2.6x slower than bands of 4 or more (56+ columns)
BAND_COLUMNS = 128
MAX_KERNEL = 15


def block_supported(expand: nn.Conv2d, depthwise: nn.Conv2d, project: nn.Conv2d) -> str | None:
    """Why the three convolutions cannot form a fused block (None: they can)."""
    for name, conv in (("expand", expand), ("project", project)):
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
            return f"the {name} convolution is not a plain 1x1 convolution"
    k, s = depthwise.kernel_size, depthwise.stride
    if not (depthwise.groups == depthwise.in_channels == depthwise.out_channels == expand.out_channels):
        return "the middle convolution is not depthwise over the expanded channels"
    if project.in_channels != depthwise.out_channels:
        return "the project convolution does not read the depthwise output"
    if k[0] != k[1] or k[0] % 2 == 0 or k[0] > MAX_KERNEL or s[0] != s[1] or depthwise.dilation != (1, 1):
        return "the depthwise kernel is not square and odd (at most 15) with equal strides and no dilation"
    if depthwise.padding != (k[0] // 2, k[0] // 2) or depthwise.padding_mode != "zeros":
        return "the depthwise convolution is not zero-padded by half its kernel"
    return None


@register_leaf_type
class SparseInvertedResidual(TransientState, nn.Module):
    """``project(dw_act(depthwise(expand_act(expand(x))))) (+ x)`` with sparse expand / project weights.

    The buffers are validated (``check``) when the block is built, loaded (``sparsifx.load``) or given a state dict,
    and before the kernel first reads them: an index out of range is a ``BackendError``, never a read outside a
    buffer. (Writing into the buffers by hand after the first call is not re-checked.)"""

    TRANSIENT_ATTRS = ("_checked",)

    def __init__(
        self,
        convs: tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d],
        weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        activations: tuple[str | None, str | None],
        residual: bool,
    ):
        super().__init__()
        expand, depthwise, project = convs
        reason = block_supported(expand, depthwise, project)
        if reason is not None:
            raise BackendError(f"SparseInvertedResidual: {reason}")
        if any(a not in ACTIVATIONS for a in activations):
            raise BackendError(f"unknown fused activation in {activations}; known: {list(ACTIVATIONS)}")
        if residual and (depthwise.stride != (1, 1) or project.out_channels != expand.in_channels):
            raise BackendError("SparseInvertedResidual: a residual needs stride 1 and as many outputs as inputs")
        self.in_channels, self.expanded = expand.in_channels, expand.out_channels
        self.out_channels = project.out_channels
        self.kernel, self.stride = depthwise.kernel_size[0], depthwise.stride[0]
        self.expand_activation, self.dw_activation = activations
        self.residual = bool(residual)
        with torch.inference_mode(False):  # plain tensors even when built under inference_mode
            for prefix, conv, weight in (("e", expand, weights[0]), ("p", project, weights[2])):
                packed = pack(weight.detach(), 1)
                self.register_buffer(f"{prefix}_ptr", packed["rowptr"].clone())
                self.register_buffer(f"{prefix}_col", packed["chan"].clone())
                self.register_buffer(f"{prefix}_val", packed["val"].clone())
                self.register_buffer(f"{prefix}_bias", _bias(conv))
            self.register_buffer("dw", weights[1].detach().float().reshape(self.expanded, -1).clone().contiguous())
            self.register_buffer("dw_bias", _bias(depthwise))
        self.check()
        self.drop_transient()  # checked again before the first call: the buffers may be written until then

    @property
    def nnz(self) -> tuple[int, int]:
        return self.e_val.numel(), self.p_val.numel()

    def check(self) -> None:
        """``BackendError`` unless the buffers form valid weights of this block's shape."""
        who = type(self).__name__
        taps = self.kernel * self.kernel
        check_packed(self.e_ptr, self.e_col, torch.zeros_like(self.e_col), self.e_val, self.e_bias,
                     self.expanded, self.in_channels, 1, 1, who + " (expand)")  # fmt: skip
        check_packed(self.p_ptr, self.p_col, torch.zeros_like(self.p_col), self.p_val, self.p_bias,
                     self.out_channels, self.expanded, 1, 1, who + " (project)")  # fmt: skip
        if self.dw.dtype != torch.float32 or tuple(self.dw.shape) != (self.expanded, taps):
            raise BackendError(f"{who}: the depthwise weight must be float32 of shape ({self.expanded}, {taps})")
        if self.dw_bias is not None and (self.dw_bias.dtype != torch.float32 or self.dw_bias.shape != (self.expanded,)):
            raise BackendError(f"{who}: the depthwise bias must be float32 of shape ({self.expanded},)")
        self.__dict__["_checked"] = True

    def _after_load(self) -> None:
        """Called by ``sparsifx.load``: attributes and buffers must describe a valid block."""
        self.drop_transient()
        ints = (self.in_channels, self.expanded, self.out_channels, self.kernel, self.stride)
        if any(type(i) is not int or not 1 <= i <= 1 << 16 for i in ints) or self.kernel % 2 == 0:
            raise BackendError(f"{type(self).__name__}: channels, kernel (odd) and stride must be positive integers")
        if self.kernel > MAX_KERNEL or type(self.residual) is not bool:
            raise BackendError(f"{type(self).__name__}: kernel at most {MAX_KERNEL}, residual a bool")
        if self.residual and (self.stride != 1 or self.in_channels != self.out_channels):
            raise BackendError(f"{type(self).__name__}: a residual needs stride 1 and as many outputs as inputs")
        if self.expand_activation not in ACTIVATIONS or self.dw_activation not in ACTIVATIONS:
            raise BackendError(f"{type(self).__name__}: unknown fused activation")
        self.check()

    def band_rows(self, w: int, wo: int) -> int:
        """Output rows per band: as many as keep the band's buffers within ``BAND_BYTES``, and at least
        ``BAND_COLUMNS`` output columns (narrow images: the 1x1 steps pay each non-zero's loads per band)."""
        k, s, c = self.kernel, self.stride, self.expanded
        per_row = c * (s * (w + k - 1) + wo) * 4  # each further output row: s expanded rows and one depthwise row
        fixed = c * (k - s) * (w + k - 1) * 4
        return max(1, (BAND_BYTES - fixed) // per_row, -(-BAND_COLUMNS // wo))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise BackendError(
                "SparseInvertedResidual is inference-only; run it under torch.no_grad() or torch.inference_mode()"
            )
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BackendError(
                f"SparseInvertedResidual computes on float32 NCHW input with {self.in_channels} channels; got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        if not self.__dict__.get("_checked"):
            self.check()
        n, _, h, w = x.shape
        k, s, p = self.kernel, self.stride, self.kernel // 2
        if h + 2 * p < k or w + 2 * p < k:
            raise BackendError(f"SparseInvertedResidual: a {h}x{w} input is smaller than the {k}x{k} window")
        wo = (w + 2 * p - k) // s + 1
        threads = torch.get_num_threads()
        items = max(1, -(-threads // n))  # runs of output rows per image: every thread busy
        geom = [k, s, p, self.band_rows(w, wo), items, int(self.residual)]
        lo_e, hi_e = ACTIVATIONS[self.expand_activation]
        lo_d, hi_d = ACTIVATIONS[self.dw_activation]
        return cpp_kernel.load().block(
            x, self.e_ptr, self.e_col, self.e_val, self.e_bias, self.dw, self.dw_bias,
            self.p_ptr, self.p_col, self.p_val, self.p_bias, geom, [lo_e, hi_e, lo_d, hi_d],
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} -> {self.expanded} -> {self.out_channels}, kernel={self.kernel}, "
            f"stride={self.stride}, nnz={self.nnz}, activations=({self.expand_activation}, {self.dw_activation}), "
            f"residual={self.residual}"
        )


def _bias(conv: nn.Conv2d) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias.detach().float().clone()
