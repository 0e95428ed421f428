"""Element-wise selection kernels used by SWAT: a torch implementation and a NumPy fast path for CPU.

On this torch build several CPU kernels that SWAT leans on are slow (measured, 1M float32, one
thread: ``torch.kthvalue`` 30 ms vs ``np.partition`` 2 ms; ``masked_select`` 13 ms vs ``np.compress``
1.6 ms; bool-producing compares 5x slower). ``ops_for(t)`` returns the NumPy kernels for CPU
float32/float64 tensors (zero-copy views through ``Tensor.numpy()``) and the torch kernels otherwise
(GPU, half types). Both give bit-identical results; the tests run both.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_PACK_MAGIC = 0x0102040810204080  # gathers the low bit of 8 bytes into the top byte of an int64
_BITS: dict[torch.device, torch.Tensor] = {}
SAMPLE = 4096  # random sample size used to bracket the k-th largest value
MIN_FAST = 1 << 15  # below this many values plain torch.kthvalue is used
_GEN: dict[str, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    key = str(device)
    if key not in _GEN:  # private generator: never perturbs the user's global RNG stream
        _GEN[key] = torch.Generator(device=device)
        _GEN[key].manual_seed(0x5A7)
    return _GEN[key]


def _bracketed_kth(flat: torch.Tensor, k: int) -> float | None:
    """Select inside the sample-quantile band around the answer; None when the band misses it."""
    n = flat.numel()
    sample = flat[torch.randint(n, (SAMPLE,), generator=_generator(flat.device), device=flat.device)].sort().values
    p = k / n
    margin = 6.0 * math.sqrt(SAMPLE * p * (1 - p)) + 2
    lo_i, hi_i = int(SAMPLE * (1 - p) - margin), int(SAMPLE * (1 - p) + margin)
    above = flat[flat >= sample[lo_i]] if lo_i >= 0 else flat
    if above.numel() < k:
        return None
    band = above[above <= sample[hi_i]] if hi_i < SAMPLE else above
    n_over = above.numel() - band.numel()  # entries above the band
    if n_over >= k or band.numel() == 0:
        return None
    return float(torch.kthvalue(band, band.numel() - (k - n_over) + 1).values)


class TorchOps:
    """Reference kernels in plain torch (any device, any dtype)."""

    @staticmethod
    def abs_ge(x: torch.Tensor, thr: float) -> torch.Tensor:
        return x.detach().abs() >= thr

    @classmethod
    def topk_mask(cls, t: torch.Tensor, k: int, floor: float = float("-inf")) -> tuple[torch.Tensor, float]:
        """``(|t| >= max(thr, floor), thr)`` with ``thr`` the k-th largest ``|t|``, ``1 <= k < numel``."""
        a = t.detach().abs()
        thr = cls.kth_largest(a, k)
        return a >= max(thr, floor), thr

    @classmethod
    def abs_kth_largest(cls, t: torch.Tensor, k: int) -> float:
        """k-th largest ``|t|``, ``1 <= k < numel``."""
        return cls.kth_largest(t.detach().abs(), k)

    @staticmethod
    def kth_largest(a: torch.Tensor, k: int) -> float:
        """k-th largest entry, ``1 <= k <= numel`` (bracketed by a random sample when large, exact)."""
        flat = a.detach().reshape(-1)
        if flat.numel() >= MIN_FAST:
            found = _bracketed_kth(flat, k)
            if found is not None:
                return found
        return float(torch.kthvalue(flat, flat.numel() - k + 1).values)

    @staticmethod
    def pack_bits(mask: torch.Tensor) -> torch.Tensor:
        flat = mask.reshape(-1)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        words = flat.view(torch.uint8).view(torch.int64)
        return (((words * _PACK_MAGIC) >> 56) & 0xFF).to(torch.uint8)

    @staticmethod
    def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
        bits = _BITS.get(packed.device)
        if bits is None:
            bits = _BITS[packed.device] = torch.tensor(
                [1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device
            )
        n = math.prod(shape)
        return ((packed.unsqueeze(1) & bits) != 0).view(-1)[:n].view(shape)

    @staticmethod
    def select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x.detach().masked_select(mask)

    @staticmethod
    def scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(mask.shape).masked_scatter_(mask, values)

    @staticmethod
    def apply_mask(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, w.detach(), 0)

    @staticmethod
    def positive(x: torch.Tensor) -> torch.Tensor:
        return x.detach() > 0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class NumpyOps(TorchOps):
    """The same kernels through NumPy (CPU, float32/float64 only)."""

    @staticmethod
    def abs_ge(x, thr):
        return torch.from_numpy(np.abs(_np(x)) >= thr)

    @classmethod
    def topk_mask(cls, t, k, floor=float("-inf")):
        thr = cls.abs_kth_largest(t, k)
        return cls.abs_ge(t, max(thr, floor)), thr

    @staticmethod
    def abs_kth_largest(t, k):
        flat = np.abs(_np(t)).reshape(-1)
        flat.partition(flat.size - k)  # in place on the abs copy
        return float(flat[flat.size - k])

    @staticmethod
    def kth_largest(a, k):
        flat = _np(a).reshape(-1)
        n = flat.size
        return float(np.partition(flat, n - k)[n - k])

    @staticmethod
    def pack_bits(mask):
        return torch.from_numpy(np.packbits(_np(mask).reshape(-1), bitorder="little"))

    @staticmethod
    def unpack_bits(packed, shape):
        n = math.prod(shape)
        return torch.from_numpy(np.unpackbits(_np(packed), count=n, bitorder="little").view(np.bool_)).view(shape)

    @staticmethod
    def select(x, mask):
        return torch.from_numpy(np.compress(_np(mask).reshape(-1), _np(x).reshape(-1)))

    @staticmethod
    def scatter(values, mask):
        out = np.zeros(tuple(mask.shape), dtype=_np(values).dtype)
        if values.numel():
            np.place(out, _np(mask), _np(values))
        return torch.from_numpy(out)

    @staticmethod
    def apply_mask(w, mask):
        return torch.from_numpy(_np(w) * _np(mask))

    @staticmethod
    def positive(x):
        return torch.from_numpy(_np(x) > 0)


NUMPY_DTYPES = (torch.float32, torch.float64)


def ops_for(t: torch.Tensor) -> type[TorchOps]:
    """NumPy kernels for CPU float32/float64 tensors, torch kernels otherwise."""
    if t.device.type == "cpu" and t.dtype in NUMPY_DTYPES:
        return NumpyOps
    return TorchOps
