"""``DirectSparseConv2d``: a lowered Conv2d that runs the direct sparse convolution of ``backends/cpp_kernel.py``.

The weight is stored once as CSR over output channels with, per non-zero, its absolute input channel and its tap
(``a * kw + b``); the per-non-zero offsets into the input grid depend on the input's height and width and are
computed on first use of each input size (cached per size, never saved), in channel blocks where a tile's reads
would overflow the L1 cache (``channel_blocks``; the non-zeros then stored block-major). An optional fused epilogue
adds a residual (``forward(x, residual)``) and applies an activation (``ACTIVATIONS``: ReLU, ReLU6, as clamps), as
``fuse_epilogues`` sets up. Inference only; a tracing leaf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sparsifx.errors import BackendError
from sparsifx.tracing import register_leaf_type

from . import cpp_kernel
from .transient import TransientState

INT32_MAX = 2**31 - 1
INF = float("inf")
# fused activation -> the clamp bounds the kernel applies
ACTIVATIONS: dict[str | None, tuple[float, float]] = {None: (-INF, INF), "relu": (0.0, INF), "relu6": (0.0, 6.0)}
# grid bytes one input-channel block may read per 64-column tile (every row of the tile reads that block from L1);
# chosen on resnet50 at 90% on this project's 2-core EPYC (Zen 3, 32 KB L1), whole model against onnxruntime in one
# interleaved run: 24 KB gave 3.06x at batch 1 (one and two threads) and 1.47x at batch 16, 48 KB 2.83x and 1.36x,
# 16 KB and 64 KB less; mobilenet_v2 (1x1 layers) within noise of all sizes
CHANNEL_BLOCK_BYTES = 24 << 10


def channel_blocks(in_channels: int, groups: int, n_phases: int, max_shift: int, columns: int) -> int:
    """Input channels per block for a convolution whose taps read up to ``max_shift`` grid columns past a tile of
    ``min(64, columns)``, in ``n_phases`` stride phases per channel (grouped convolutions: one block)."""
    if groups != 1:
        return in_channels
    per_channel = n_phases * (min(64, columns) + max_shift) * 4
    return max(1, CHANNEL_BLOCK_BYTES // per_channel)


def block_major(rowptr: torch.Tensor, chan: torch.Tensor, off: torch.Tensor, val: torch.Tensor, per_block: int):
    """``(pointers [blocks, R + 1], off, val)``: the non-zeros ordered by input-channel block, then row (one block:
    the CSR arrays as they are)."""
    rows = rowptr.numel() - 1
    n_blocks = (int(chan.max()) + per_block) // per_block if chan.numel() else 1  # blocks up to the last channel
    if n_blocks == 1:
        return rowptr.view(1, -1), off, val
    key = (chan.long() // per_block) * rows + row_of_each_nonzero(rowptr)
    order = torch.argsort(key, stable=True)  # within a (block, row): the CSR order
    counts = torch.bincount(key, minlength=n_blocks * rows).cumsum(0).view(n_blocks, rows)
    ptr = torch.zeros(n_blocks, rows + 1, dtype=torch.int64)
    ptr[:, 1:] = counts
    ptr[1:, 0] = counts[:-1, -1]
    return ptr, off[order].contiguous(), val[order].contiguous()


@dataclass(frozen=True)
class Geometry:
    """Where each tap of a convolution reads in the prepared grid, for one input size."""

    ho: int
    wo: int
    hq: int
    wq: int
    phases: tuple[int, ...]  # flat (py, px) pairs of the stride phases the taps use
    tap_phase: torch.Tensor  # [kh * kw] index into phases
    tap_shift: torch.Tensor  # [kh * kw] row_off * wq + col_off
    direct: bool  # the input itself is the grid (1x1, stride 1, no padding)

    def args(self, stride, padding, out_pad=(0, 0)) -> list[int]:
        return [
            stride[0],
            stride[1],
            padding[0],
            padding[1],
            self.hq,
            self.wq,
            self.ho,
            self.wo,
            int(self.direct),
            out_pad[0],
            out_pad[1],
        ]


def padded_size(h: int, w: int, pad: tuple[int, int]) -> tuple[int, int]:
    """The stored size of an ``h x w`` output written with ``pad`` (and the extra zero row the grid reads)."""
    return h + 2 * pad[0] + 1, w + 2 * pad[1]


def is_same_stride1(kernel_size, stride, padding, dilation) -> bool:
    """A stride-1 convolution whose padding keeps the size (``2 p == d (k - 1)``): it can read a padded input."""
    return tuple(stride) == (1, 1) and all(2 * p == d * (k - 1) for k, p, d in zip(kernel_size, padding, dilation))


def conv_output_size(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution on an ``h x w`` input (floor mode, as ``F.conv2d``)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def row_of_each_nonzero(rowptr: torch.Tensor) -> torch.Tensor:
    """The CSR row of every non-zero (``rowptr`` checked by ``rowptr_is_valid`` first)."""
    return torch.repeat_interleave(torch.arange(rowptr.numel() - 1), rowptr[1:] - rowptr[:-1])


def rowptr_is_valid(rowptr: torch.Tensor, nnz: int) -> bool:
    """CSR row pointers rise from 0 to ``nnz`` and never fall."""
    return int(rowptr[0]) == 0 and int(rowptr[-1]) == nnz and not bool((rowptr[1:] < rowptr[:-1]).any())


def geometry(h: int, w: int, kernel_size, stride, padding, dilation, prepadded: bool = False) -> Geometry:
    """Where each tap reads for an ``h x w`` input; ``prepadded``: the input is already stored padded (as
    ``padded_size``) by the layer before, and is the grid itself."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if prepadded:
        taps = torch.tensor([a * dh * w + b * dw for a in range(kh) for b in range(kw)], dtype=torch.int64)
        ho, wo = h - 2 * ph - 1, w - 2 * pw
        return Geometry(ho, wo, h, w, (0, 0), torch.zeros(kh * kw, dtype=torch.int64), taps, True)
    ho, wo = conv_output_size(h, w, kernel_size, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise BackendError(f"convolution input {h}x{w} is smaller than its kernel")
    taps = [(a * dh, b * dw) for a in range(kh) for b in range(kw)]
    phase_of = {(ra % sh, cb % sw) for ra, cb in taps}
    phases = sorted(phase_of)
    row_off = max(ra // sh for ra, _ in taps)
    col_off = max(cb // sw for _, cb in taps)
    wq = wo + col_off
    hq = ho + row_off + (1 if col_off else 0)
    direct = (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (ph, pw) == (0, 0)
    if direct:
        hq, wq = h, w
    index = {p: i for i, p in enumerate(phases)}
    tap_phase = torch.tensor([index[(ra % sh, cb % sw)] for ra, cb in taps], dtype=torch.int64)
    tap_shift = torch.tensor([(ra // sh) * wq + cb // sw for ra, cb in taps], dtype=torch.int64)
    return Geometry(ho, wo, hq, wq, tuple(v for p in phases for v in p), tap_phase, tap_shift, direct)


def pack(weight: torch.Tensor, groups: int) -> dict[str, torch.Tensor]:
    """CSR rows (output channels) of a ``[out, in / groups, kh, kw]`` weight: rowptr, input channel, tap, value."""
    out_c, in_per_group, kh, kw = weight.shape
    w = weight.detach().float().reshape(out_c, -1)
    rows, cols = (w != 0).nonzero(as_tuple=True)  # row-major: within a row by (channel, tap)
    group = rows // (out_c // groups)
    chan = group * in_per_group + cols // (kh * kw)
    rowptr = torch.zeros(out_c + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(rows, minlength=out_c).cumsum(0)
    return {
        "rowptr": rowptr,
        "chan": chan.to(torch.int32),
        "tap": (cols % (kh * kw)).to(torch.int32),
        "val": w[rows, cols].contiguous(),
    }


def check_packed(rowptr, chan, tap, val, bias, out_c: int, in_c: int, groups: int, taps: int, who: str) -> None:
    """Validate CSR buffers of a ``[out_c, in_c / groups, kh, kw]`` weight (they may come from a file)."""

    def fail(why: str):
        raise BackendError(f"{who}: invalid sparse weight buffers: {why}")

    for name, t, dtype in (
        ("rowptr", rowptr, torch.int64),
        ("chan", chan, torch.int32),
        ("tap", tap, torch.int32),
        ("val", val, torch.float32),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or t.device.type != "cpu":
            fail(f"'{name}' must be a 1-D CPU {dtype} tensor")
    nnz = val.numel()
    if rowptr.numel() != out_c + 1 or chan.numel() != nnz or tap.numel() != nnz:
        fail(f"sizes: rowptr {rowptr.numel()} (want {out_c + 1}), chan {chan.numel()}, tap {tap.numel()}, val {nnz}")
    if not rowptr_is_valid(rowptr, nnz):
        fail("rowptr must rise from 0 to the number of non-zeros")
    if nnz and (int(tap.min()) < 0 or int(tap.max()) >= taps):
        fail(f"tap index outside [0, {taps})")
    if nnz:
        lo = (row_of_each_nonzero(rowptr) // (out_c // groups)) * (in_c // groups)
        c = chan.long()
        if bool(((c < lo) | (c >= lo + in_c // groups)).any()):
            fail("input channel outside the row's group")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (out_c,)):
        fail(f"bias must be float32 of shape ({out_c},)")


@register_leaf_type
class DirectSparseConv2d(TransientState, nn.Module):
    """``conv2d(x, W) (+ residual) (-> relu)`` with ``W`` sparse, as one C++ call (no im2col).

    The index buffers are validated (``check``) before the kernel first reads them: when the layer is built,
    loaded from a file (``sparsifx.load``) or given a state dict. An index out of range is a ``BackendError``,
    never a read outside a buffer. (Writing into the buffers by hand afterwards is not re-checked.)"""

    TRANSIENT_ATTRS = ("_cache",)  # per-input-size offsets: rebuilt on use, never saved

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, *, activation: str | None = None, residual: bool = False):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise BackendError(
                f"DirectSparseConv2d needs zero padding given as numbers; got padding="
                f"{conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        if activation not in ACTIVATIONS:
            raise BackendError(f"unknown fused activation {activation!r}; known: {list(ACTIVATIONS)}")
        self.activation, self.residual = activation, residual
        self.out_pad = (0, 0)  # write the output zero-padded for the next layer (fuse_epilogues sets it)
        self.in_padded = False  # the input arrives padded by the layer before
        with torch.inference_mode(False):  # plain tensors even when built under inference_mode
            for key, value in pack(weight.clone(), conv.groups).items():
                self.register_buffer(key, value.clone())
            self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())

    @property
    def nnz(self) -> int:
        return self.val.numel()

    def check(self) -> None:
        """``BackendError`` unless the buffers form a valid sparse weight of this layer's shape."""
        check_packed(
            self.rowptr,
            self.chan,
            self.tap,
            self.val,
            self.bias,
            self.out_channels,
            self.in_channels,
            self.groups,
            self.kernel_size[0] * self.kernel_size[1],
            type(self).__name__,
        )

    def _after_load(self) -> None:
        """Called by ``sparsifx.load`` on a module it rebuilt from a file: its attributes and buffers must
        describe a valid layer (the kernel also bounds every read by the input it is given)."""
        self.drop_transient()

        def pair(name, lo):
            v = getattr(self, name, None)
            if not (isinstance(v, tuple) and len(v) == 2 and all(type(i) is int and lo <= i <= 1 << 16 for i in v)):
                raise BackendError(f"{type(self).__name__}: attribute '{name}' must be two integers >= {lo}")

        for name, lo in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1), ("out_pad", 0)):
            pair(name, lo)
        ints = (self.in_channels, self.out_channels, self.groups)
        if (
            any(type(i) is not int or i < 1 for i in ints)
            or self.in_channels % self.groups
            or self.out_channels % self.groups
        ):
            raise BackendError(f"{type(self).__name__}: channels and groups must be positive, groups dividing both")
        if self.activation not in ACTIVATIONS or type(self.residual) is not bool or type(self.in_padded) is not bool:
            raise BackendError(f"{type(self).__name__}: invalid activation / residual / in_padded attribute")
        self.check()

    def _plan(self, h: int, w: int):
        """``(geometry args, phases, block pointers, offsets, values)`` for an ``h x w`` input (cached per size; the
        buffers are checked before the first plan)."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            self.check()
            cache = self.__dict__["_cache"] = {}
        plan = cache.get((h, w))
        if plan is None:
            g = geometry(h, w, self.kernel_size, self.stride, self.padding, self.dilation, self.in_padded)
            n_phases = len(g.phases) // 2
            plane = g.hq * g.wq
            if self.in_channels * n_phases * plane > INT32_MAX:
                raise BackendError(f"input {h}x{w} with {self.in_channels} channels is too large for 32-bit offsets")
            tap = self.tap.long()
            off = (self.chan.long() * n_phases + g.tap_phase[tap]) * plane + g.tap_shift[tap]
            if off.numel() and int(off.min()) < 0:
                raise BackendError(f"{type(self).__name__}: negative grid offsets (invalid geometry)")
            max_off = int(off.max()) if off.numel() else 0
            per_block = channel_blocks(self.in_channels, self.groups, n_phases, int(g.tap_shift.max()), g.ho * g.wq)
            ptr, off, val = block_major(self.rowptr, self.chan, off.to(torch.int32).contiguous(), self.val, per_block)
            if not rowptr_is_valid(ptr.reshape(-1), self.nnz):
                raise BackendError(f"{type(self).__name__}: invalid channel-block pointers")
            plan = cache[(h, w)] = (
                g.args(self.stride, self.padding, self.out_pad) + [max_off],
                list(g.phases),
                ptr,
                off,
                val,
            )
        return plan

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise BackendError(
                "DirectSparseConv2d is inference-only; run it under torch.no_grad() or torch.inference_mode()"
            )
        if x.dtype != torch.float32 or x.dim() != 4:
            raise BackendError(f"DirectSparseConv2d computes on float32 NCHW input; got {x.dtype} {tuple(x.shape)}")
        geom, phases, ptr, off, val = self._plan(x.shape[2], x.shape[3])
        if (residual is not None) != self.residual:
            raise BackendError("DirectSparseConv2d: pass a residual exactly when the layer was built with one")
        lo, hi = ACTIVATIONS[self.activation]
        return cpp_kernel.load().conv(x, ptr, off, val, self.bias, residual, lo, hi, geom, phases)

    def extra_repr(self) -> str:
        fused = (
            "+".join(k for k, on in (("residual", self.residual), (self.activation, self.activation)) if on) or "none"
        )
        pads = (f", out_pad={self.out_pad}" if any(self.out_pad) else "") + (", in_padded" if self.in_padded else "")
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, nnz={self.nnz}, fused={fused}{pads}"
        )


def direct_supported(conv: nn.Conv2d) -> bool:
    """Zero padding given as numbers (depthwise included: ``lower`` times it against the dense kernel)."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
