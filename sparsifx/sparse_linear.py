"""``SparseLinear``: a Linear layer stored as its non-zeros, for truly sparse training (``storage: sparse``).

The weight ``W`` (``out × in``) is held as CSR: ``values`` (an ``nn.Parameter`` of length nnz, row-major order),
``crow`` (``out+1``) and ``col`` (nnz) int32 buffers, plus the transposed structure ``t_crow``/``t_col``/``t_perm``
(``W^T`` in CSR; ``t_perm[p]`` is the position in ``values`` of ``W^T``'s p-th non-zero). A step computes

    forward         y   = x W^T + b            sparse × dense   (torch.sparse CSR, MKL on x86)
    input gradient  ∂x  = ∂y W                 transposed sparse × dense
    weight gradient ∂v  = (∂y^T x)[pattern]    sampled dense–dense product, at the non-zeros only

so no tensor of the dense weight's size exists in a normal step, and any ``torch.optim`` optimizer keeps state of
nnz entries. bf16 values are stored in bf16 and multiplied in fp32 (torch's CPU sparse kernels have no bf16):
the fp32 copy is nnz-sized, never dense-sized.

With ``dense_grad = True`` (RigL update steps) the backward also keeps ``(x, ∂y)`` in ``probe`` so that the
grower can form the dense gradient ``∂y^T x`` in row blocks of bounded memory (``dense_grad_blocks``).

Indices come from files too (``sparsifx.load``): they are validated before the first product that uses them
(``check_topology``) — an out-of-range index is a ``PassError``, never a read outside a buffer.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Iterator

import torch
import torch.nn as nn

from .errors import PassError
from .tracing import register_leaf_type

INDEX_DTYPE = torch.int32
SPARSE_INDEX_BUFFERS = ("crow", "col", "t_crow", "t_col", "t_perm")
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # torch's one-time notice
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class SparseLinearFn(torch.autograd.Function):
    """``x @ W^T + b`` with ``W`` given by ``layer``'s CSR structure and ``values`` (see the module docstring).
    ``index`` is ``(crow, col, t_crow, t_col, t_perm)``, read from the layer once per call."""

    @staticmethod
    def forward(ctx, x2, values, bias, layer, index):
        crow, col = index[0], index[1]
        compute = torch.float32 if values.dtype == torch.bfloat16 else values.dtype
        w = _csr(crow, col, values.detach().to(compute), layer.shape)
        y = torch.mm(w, x2.to(compute).t()).t()  # (B, out) as a transposed view: the next layer reads x^T
        if bias is not None:
            y.add_(bias.to(compute))
        ctx.save_for_backward(x2, values)
        ctx.layer, ctx.index, ctx.has_bias = layer, index, bias is not None
        return y if y.dtype == x2.dtype else y.to(x2.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x2, values = ctx.saved_tensors
        layer = ctx.layer
        crow, col, t_crow, t_col, t_perm = ctx.index
        compute = torch.float32 if values.dtype == torch.bfloat16 else values.dtype
        v = values.detach().to(compute)
        gy = grad_y.to(compute)
        need_x, need_v, need_b, _, _ = ctx.needs_input_grad
        grad_x = grad_v = grad_b = None
        if need_x:
            wt = _csr(t_crow, t_col, torch.index_select(v, 0, t_perm), (layer.in_features, layer.out_features))
            grad_x = torch.mm(wt, gy.t()).t()
            grad_x = grad_x if grad_x.dtype == x2.dtype else grad_x.to(x2.dtype)
        if need_v:  # beta = 0: the pattern's values are not read, only its positions
            grad_v = torch.sparse.sampled_addmm(_csr(crow, col, v, layer.shape), gy.t(), x2.to(compute), beta=0.0)
            grad_v = grad_v.values().to(values.dtype)
            if layer.dense_grad:
                layer.probe.append((x2.detach(), grad_y.detach()))
        if need_b and ctx.has_bias:
            grad_b = grad_y.sum(0)
        return grad_x, grad_v, grad_b, None, None


@register_leaf_type
class SparseLinear(nn.Module):
    """A Linear layer whose weight exists only at its non-zeros (see the module docstring)."""

    dense_grad: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype or torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32)) if bias else None
        for name, size in (
            ("crow", out_features + 1),
            ("col", 0),
            ("t_crow", in_features + 1),
            ("t_col", 0),
            ("t_perm", 0),
        ):
            self.register_buffer(name, torch.zeros(size, dtype=INDEX_DTYPE))
        self.probe: list[tuple[torch.Tensor, torch.Tensor]] = []

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, linear: nn.Module, keys: torch.Tensor, generator: torch.Generator | None = None
    ) -> "SparseLinear":
        """A sparse layer holding ``linear.weight`` (``out × in``, or ``out × in × 1 × 1``) at the row-major linear
        positions ``keys``. A layer built on the ``meta`` device (a width whose dense weight cannot exist) gets
        fresh values instead, drawn from ``generator``: He-uniform over the real fan-in ``f = nnz / out`` (the mean
        number of incoming connections), U(±sqrt(6/f)) for the weights and U(±1/sqrt(f)) for the bias, as the
        truly-sparse reference initialises its sparse matrices (a dense-fan-in init would shrink the activations
        by sqrt(density) per layer); the result lives on the CPU."""
        w = linear.weight.detach()
        meta = w.is_meta
        device = torch.device("cpu") if meta else w.device
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None, dtype=w.dtype)
        layer.to(device)
        keys = torch.as_tensor(keys, dtype=torch.int64).sort().values
        if meta:
            fan_in = max(1.0, keys.numel() / w.shape[0])
            values = (torch.rand(keys.numel(), generator=generator) * 2 - 1) * math.sqrt(6.0 / fan_in)
            layer.set_topology(keys, values.to(w.dtype))
            if linear.bias is not None:
                bias = (torch.rand(w.shape[0], generator=generator) * 2 - 1) / math.sqrt(fan_in)
                layer.bias.data.copy_(bias)
        else:
            layer.set_topology(keys, w.reshape(-1)[keys.to(device)].clone())
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach())
        layer.train(linear.training)
        return layer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def density(self) -> float:
        return self.nnz / max(1, self.out_features * self.in_features)

    def rows(self) -> torch.Tensor:
        """Row index of each non-zero (int64, nnz)."""
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)

    def keys(self) -> torch.Tensor:
        """Row-major linear position ``row·in + col`` of each non-zero (int64, sorted)."""
        return self.rows() * self.in_features + self.col.long()

    @torch.no_grad()
    def set_topology(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Install non-zeros at the sorted unique linear positions ``keys`` with ``values`` (same order). When nnz is
        unchanged the ``values`` Parameter keeps its identity and storage (optimizers and DDP keep pointing at it);
        when it changes (GMP) a new Parameter replaces it: the caller moves the optimizer over
        (``SparseController.replace_topology`` does)."""
        keys = keys.to(torch.int64)
        numel = self.out_features * self.in_features
        if keys.numel() and (int(keys[0]) < 0 or int(keys[-1]) >= numel or bool((keys[1:] <= keys[:-1]).any())):
            raise PassError(f"SparseLinear {self.shape}: positions must be sorted, unique and in [0, {numel})")
        if values.numel() != keys.numel():
            raise PassError(f"SparseLinear: {values.numel()} values for {keys.numel()} positions")
        if keys.numel() >= 2**31:
            raise PassError(f"SparseLinear: {keys.numel()} non-zeros exceed the int32 index range")
        dev = self.crow.device
        rows, cols = (keys // self.in_features).to(dev), (keys % self.in_features).to(dev)
        self.crow = _offsets(rows, self.out_features)
        self.col = cols.to(INDEX_DTYPE)
        order = torch.argsort(cols * self.out_features + rows)
        self.t_perm = order.to(INDEX_DTYPE)
        self.t_col = rows[order].to(INDEX_DTYPE)
        self.t_crow = _offsets(cols, self.in_features)
        values = values.to(self.values.dtype)
        if values.numel() == self.values.numel():
            self.values.copy_(values)
        else:  # autograd caches a leaf's shape: a resized Parameter must be a new one
            self.values = nn.Parameter(values.contiguous(), requires_grad=self.values.requires_grad)
        _CHECKED[self] = self._version_key(self._index())

    def _index(self) -> tuple[torch.Tensor, ...]:
        buffers = self._buffers
        return tuple(buffers[k] for k in SPARSE_INDEX_BUFFERS)

    def _version_key(self, index: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((id(t), t._version, t.numel()) for t in index) + (self.values.numel(),)

    def check_topology(self) -> tuple[torch.Tensor, ...]:
        """Validate the index buffers (they may come from a file) once per change (``PassError`` when broken);
        returns them as ``(crow, col, t_crow, t_col, t_perm)``."""
        index = self._index()
        if _CHECKED.get(self) == self._version_key(index):
            return index
        nnz, out, inp = self.values.numel(), self.out_features, self.in_features
        problems = []
        for name, offsets, n_idx, bound in (
            ("crow", self.crow, self.col, inp),
            ("t_crow", self.t_crow, self.t_col, out),
        ):
            if offsets.dtype != INDEX_DTYPE or n_idx.dtype != INDEX_DTYPE:
                problems.append(f"{name} indices must be int32")
            elif offsets.numel() != (out if name == "crow" else inp) + 1 or n_idx.numel() != nnz:
                problems.append(f"{name} has the wrong length")
            elif int(offsets[0]) != 0 or int(offsets[-1]) != nnz or bool((offsets[1:] < offsets[:-1]).any()):
                problems.append(f"{name} offsets are not a non-decreasing 0..nnz sequence")
            elif nnz and (int(n_idx.min()) < 0 or int(n_idx.max()) >= bound):
                problems.append(f"{name} column index out of range")
        if not problems and (
            self.t_perm.numel() != nnz or (nnz and (int(self.t_perm.min()) < 0 or int(self.t_perm.max()) >= nnz))
        ):
            problems.append("t_perm out of range")
        if problems:
            raise PassError(f"SparseLinear {self.shape} has an invalid sparse structure: {'; '.join(problems)}")
        _CHECKED[self] = self._version_key(index)
        return index

    # --- compute ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.check_topology()
        lead = x.shape[:-1]
        y = SparseLinearFn.apply(x.reshape(-1, self.in_features), self.values, self.bias, self, index)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def to_dense_weight(self) -> torch.Tensor:
        """The dense ``out × in`` weight (export, compaction and tests only: dense-sized)."""
        w = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        w[self.keys()] = self.values.detach()
        return w.view(self.out_features, self.in_features)

    def _dense_twin(self) -> nn.Module:
        return nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )

    def to_linear(self) -> nn.Module:
        """The dense layer this one stands for (``nn.Linear``; ``nn.Conv2d`` 1×1), zeros off the pattern."""
        dense = self._dense_twin()
        with torch.no_grad():
            dense.weight.copy_(self.to_dense_weight().view_as(dense.weight))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

    def dense_grad_blocks(self, max_bytes: int = 64 << 20) -> Iterator[tuple[int, torch.Tensor]]:
        """``(row0, ∂L/∂W[row0:row1])`` for the dense weight gradient of the probed backward(s), one block of rows at
        a time so that at most ``max_bytes`` of it exist at once."""
        if not self.probe:
            raise PassError(
                f"SparseLinear {self.shape}: no dense-gradient probe recorded (dense_grad was off in "
                "the backward of this step)"
            )
        rows = max(1, max_bytes // (4 * self.in_features))
        for r0 in range(0, self.out_features, rows):
            block = None
            for x2, gy in self.probe:
                part = gy[:, r0 : r0 + rows].float().t() @ x2.float()
                block = part if block is None else block + part
            yield r0, block

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nnz={self.nnz}, density={self.density():.4f}"
        )


@register_leaf_type
class SparseConv2d1x1(SparseLinear):
    """A 1×1, stride-1, ungrouped ``nn.Conv2d`` in sparse storage: the same products as ``SparseLinear`` over the
    channels of every pixel (``x`` is viewed as ``(N·H·W) × C``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.check_topology()
        n, c, h, w = x.shape
        x2 = x.permute(0, 2, 3, 1).reshape(-1, c)
        y = SparseLinearFn.apply(x2, self.values, self.bias, self, index)
        return y.reshape(n, h, w, self.out_features).permute(0, 3, 1, 2)

    def _dense_twin(self) -> nn.Module:
        return nn.Conv2d(
            self.in_features,
            self.out_features,
            1,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )


def sparse_type(module: nn.Module) -> type | None:
    """The sparse-storage class for a dense layer (``nn.Linear``; a plain 1×1 ``nn.Conv2d``), else None."""
    if isinstance(module, nn.Linear):
        return SparseLinear
    if (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.padding_mode == "zeros"
    ):
        return SparseConv2d1x1
    return None


def _offsets(index: torch.Tensor, n: int) -> torch.Tensor:
    counts = (
        torch.bincount(index.long(), minlength=n)
        if index.numel()
        else torch.zeros(n, dtype=torch.int64, device=index.device)
    )
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(INDEX_DTYPE)


def is_sparse_storage(module: nn.Module) -> bool:
    return isinstance(module, SparseLinear)


def sparse_layers(root: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    for name, module in root.named_modules():
        if isinstance(module, SparseLinear):
            yield name, module


def densify_sparse_layers(root: nn.Module) -> int:
    """Replace every ``SparseLinear`` of ``root`` by the equivalent ``nn.Linear`` (in place); returns how many."""
    from .module_utils import set_submodule

    count = 0
    for name, module in list(sparse_layers(root)):
        set_submodule(root, name, module.to_linear())
        count += 1
    return count


def sparse_to_masked(root: nn.Module) -> list[str]:
    """Replace every ``SparseLinear`` by the equivalent ``MaskedLinear`` (dense weight, pattern as mask), in place,
    so that passes written for masked layers (``compact``) see it; returns the names, for ``masked_to_sparse``."""
    from .masking import set_mask
    from .module_utils import set_submodule

    names = []
    for name, module in list(sparse_layers(root)):
        dense = module.to_linear()
        set_submodule(root, name, dense)
        pattern = torch.zeros(math.prod(module.shape), device=module.values.device)
        pattern[module.keys()] = 1.0
        layer = set_mask(root, name, pattern.view_as(dense.weight))
        layer.dense_grad = module.dense_grad
        names.append(name)
    return names


def masked_to_sparse(root: nn.Module, names: list[str]) -> None:
    """Inverse of ``sparse_to_masked`` for the layers ``names`` (shapes may have changed meanwhile)."""
    from .masking import bake_masks
    from .module_utils import set_submodule

    for name in names:
        module = root.get_submodule(name)
        keys = module.mask.flatten().nonzero().squeeze(1)
        holder = nn.Module()
        holder.layer = module
        bake_masks(holder)
        layer = sparse_type(holder.layer).from_dense(holder.layer, keys)
        layer.dense_grad = bool(getattr(module, "dense_grad", False))
        set_submodule(root, name, layer)
