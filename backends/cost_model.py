"""A cost model for the sparse kernels, calibrated by timing them on the running machine (cached on disk).

Per kernel and calibration batch ``b`` the cost of a Linear is interpolated (log-log, piecewise) between timed
points ``(work, ms)``, where ``work`` is the number of non-zeros for sparse kernels and ``out * in`` for dense
ones (256², 1024² and 4096² matrices, 10% dense for the sparse kernels); between calibration batches it is
interpolated in log(batch). A convolution costs, for a sparse kernel, its 256-batch cost per non-zero and column
times the output columns plus an im2col (``F.unfold``) cost per element, and for dense ``F.conv2d`` a fitted
overhead plus a cost per multiply-add. Timings are medians of interleaved runs on the calling thread's CPU clock
when torch runs one thread (immune to a busy machine), minima on the wall clock otherwise (the uncontended cost);
every timed Linear call starts with the caches flushed (``CacheEvictor``). ``crossover`` gives the density below which
a kernel beats
torch's dense layer. The calibration is stored as JSON in ``cache_dir()``, keyed by CPU, threads and torch; it is
written atomically, and a cache file that is not a well-formed calibration is logged and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sparsifx.atomic_io import atomic_write
from sparsifx.errors import ArtefactError
from sparsifx.progress import progress

from . import cpp_kernel
from .sparse_kernels import SPARSE_KERNELS

log = logging.getLogger(__name__)

CAL_BATCHES = (1, 8, 32, 256)
CAL_SIZES = (256, 1024, 4096)
CAL_DENSITY = 0.1
CONV_REF = dict(n=4, c=128, hw=14, k=3)
CALIBRATION_FORMAT = "3"  # bump when what is measured changes: old caches are then ignored
LLC_FALLBACK_BYTES = 32 << 20  # when sysfs does not say


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine (sysfs), or 32 MiB where sysfs does not say."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except ValueError:
            continue
    return max(sizes) if sizes else LLC_FALLBACK_BYTES


class CacheEvictor:
    """Writes a buffer twice the size of the last-level cache, so that the next call reads its weights from
    memory, as a layer does inside a model whose weights exceed the cache (and as each kernel does in an
    interleaved benchmark). Without it, a 1024x1024 layer was warm or cold from one calibration to the next
    and its dense/onnxruntime ratio swung from 0.8 to 1.2."""

    def __init__(self, nbytes: int | None = None):
        self.buffer = torch.empty((nbytes or 2 * last_level_cache_bytes()) // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.fill_(1.0)


def median_ms(
    fns: dict[str, Callable[[], object]],
    reps: int = 7,
    quantile: float = 0.5,
    before: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median (or another quantile) time in ms of each callable, timed interleaved after one warm-up;
    ``before`` (untimed) runs before every timed call.

    With one torch thread the clock is the calling thread's CPU time (immune to other processes on a busy
    machine); otherwise the wall clock."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if before is not None:
                before()
            t0 = clock()
            f()
            times[k].append((clock() - t0) * 1e3)
    return {
        k: statistics.median(v) if quantile == 0.5 else sorted(v)[int(quantile * (len(v) - 1))]
        for k, v in times.items()
    }


# the calibration always times for real, even where a test replaces ``median_ms`` to fake lower's choices (a
# faked calibration would be cached on disk and mislead every later plan on this machine)
_CALIBRATION_TIMER = median_ms


def _quantile() -> float:
    """Calibration statistic: the median on the calling thread's CPU clock (one torch thread; immune to other
    processes, and what a layer costs in a run); the minimum on the wall clock (the uncontended cost)."""
    return 0.5 if torch.get_num_threads() == 1 else 0.0


def _random_sparse(n: int, density: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, n, generator=gen)
    return w * (torch.rand(n, n, generator=gen) < density)


def _interp(points: list[tuple[float, float]], work: float) -> float:
    """Piecewise log-log interpolation of ``(work, ms)`` points; flat below, proportional above the range."""
    points = sorted(points)
    if work <= points[0][0]:
        return points[0][1]
    for (w0, t0), (w1, t1) in zip(points, points[1:]):
        if work <= w1:
            f = (math.log(work) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    w, t = points[-1]
    return t * work / w


@dataclass
class Calibration:
    """Timed points ``linear[kernel][batch] = [(work, ms), ...]``; conv costs per element / multiply-add."""

    key: str
    threads: int
    linear: dict[str, dict[int, list[tuple[float, float]]]] = field(default_factory=dict)
    unfold_ms_per_elem: float = 0.0
    conv_dense_ms_per_mac: float = 0.0
    conv_dense_overhead_ms: float = 0.0

    # ---- predictions -------------------------------------------------------------------------------------
    def _at(self, kernel: str, batch: int, work: float) -> float:
        table = self.linear[kernel]
        pts = sorted(table)
        if batch <= pts[0]:
            return _interp(table[pts[0]], work)
        for lo, hi in zip(pts, pts[1:]):
            if batch <= hi:  # interpolate in log(batch)
                f = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return _interp(table[lo], work) * (1 - f) + _interp(table[hi], work) * f
        return _interp(table[pts[-1]], work) * batch / pts[-1]

    def linear_ms(self, kernel: str, out_f: int, in_f: int, nnz: int, batch: int) -> float:
        work = nnz if SPARSE_KERNELS.get(kernel).sparse else out_f * in_f
        return max(self._at(kernel, batch, max(work, 1)), 1e-4)

    def conv_ms(self, kernel: str, out_c: int, k_dim: int, nnz: int, cols: int, needs_unfold: bool) -> float:
        """``cols`` = batch * output pixels; ``k_dim`` = in_channels * kh * kw."""
        if kernel == "dense":
            return self.conv_dense_overhead_ms + self.conv_dense_ms_per_mac * out_c * k_dim * cols
        unfold = self.unfold_ms_per_elem * k_dim * cols if needs_unfold else 0.0
        top = max(self.linear[kernel])
        return self._at(kernel, top, max(nnz, 1)) * cols / top + unfold

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted(self.linear["dense"]))

    def crossover(self, kernel: str, n: int, batch: int) -> float:
        """Density of an ``n x n`` Linear below which ``kernel`` is predicted to beat torch dense."""
        dense = self.linear_ms("dense", n, n, n * n, batch)
        lo, hi = 0.0, 1.0
        for _ in range(30):  # bisection on density; sparse cost grows with nnz
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.linear_ms(kernel, n, n, int(mid * n * n), batch) < dense else (lo, mid)
        return lo

    # ---- persistence -------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = asdict(self)
        data["linear"] = {k: {str(b): [list(p) for p in v] for b, v in t.items()} for k, t in self.linear.items()}
        data["crossover_density"] = {
            k: {f"{n}@{b}": round(self.crossover(k, n, b), 4) for n in CAL_SIZES for b in self.batches}
            for k in self.linear
            if SPARSE_KERNELS.get(k).sparse
        }
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        linear = {k: {int(b): [tuple(p) for p in v] for b, v in t.items()} for k, t in data["linear"].items()}
        return cls(
            data["key"],
            data["threads"],
            linear,
            data["unfold_ms_per_elem"],
            data["conv_dense_ms_per_mac"],
            data["conv_dense_overhead_ms"],
        )


def machine_key(kernels: tuple[str, ...]) -> str:
    clock = "thread_time" if torch.get_num_threads() == 1 else "wall"
    text = "\n".join([CALIBRATION_FORMAT, cpp_kernel.build_name(), str(torch.get_num_threads()), clock, *kernels])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fit(x0: float, t0: float, x1: float, t1: float) -> tuple[float, float]:
    c = max((t1 - t0) / (x1 - x0), 1e-12)
    return max(t0 - c * x0, 0.0), c


def _layer(name: str, w: torch.Tensor) -> torch.nn.Module:
    from .sparse_modules import SparseLinear

    if name == "dense":
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        return layer
    return SparseLinear(w, None, [(None, name)])


def _calibrate_linear(
    kernels: tuple[str, ...], reps: int, sizes: tuple[int, ...], batches: tuple[int, ...]
) -> dict[str, dict[int, list[tuple[float, float]]]]:
    gen = torch.Generator().manual_seed(0)
    mats = {n: _random_sparse(n, CAL_DENSITY, gen) for n in sizes}
    evict = CacheEvictor()
    table: dict[str, dict[int, list[tuple[float, float]]]] = {k: {} for k in kernels}
    for batch in progress(batches, desc="sparsifx: calibrating sparse kernels", unit="batch size"):
        for k in kernels:
            table[k][batch] = []
        for n, w in mats.items():
            x = torch.randn(batch, n, generator=gen)
            fns = {name: _layer(name, w) for name in kernels}  # whole modules: call overhead included
            fns = {name: (lambda mod=mod: mod(x)) for name, mod in fns.items()}
            big = n >= 4096 and batch >= 256
            times = _CALIBRATION_TIMER(fns, max(3, reps // 2) if big else reps, quantile=_quantile(), before=evict)
            for name in kernels:
                work = int(w.count_nonzero()) if SPARSE_KERNELS.get(name).sparse else n * n
                table[name][batch].append((work, times[name]))
    return table


def _calibrate_conv(reps: int) -> tuple[float, float, float]:
    r = CONV_REF
    x = torch.randn(r["n"], r["c"], r["hw"], r["hw"])
    w_big = torch.randn(r["c"], r["c"], r["k"], r["k"])
    w_small = torch.randn(r["c"] // 4, r["c"], r["k"], r["k"])
    t = _CALIBRATION_TIMER(
        {
            "unfold": lambda: F.unfold(x, r["k"], padding=1).contiguous(),
            "big": lambda: F.conv2d(x, w_big, padding=1),
            "small": lambda: F.conv2d(x, w_small, padding=1),
        },
        reps,
        quantile=_quantile(),
    )
    cols = r["n"] * r["hw"] ** 2
    k_dim = r["c"] * r["k"] ** 2
    overhead, per_mac = _fit(r["c"] // 4 * k_dim * cols, t["small"], r["c"] * k_dim * cols, t["big"])
    return t["unfold"] / (k_dim * cols), per_mac, overhead


def calibrate(
    kernels: tuple[str, ...] | None = None,
    reps: int = 9,
    sizes: tuple[int, ...] = CAL_SIZES,
    batches: tuple[int, ...] = CAL_BATCHES,
) -> Calibration:
    """Time every available kernel on this machine and fit the cost model (takes seconds)."""
    kernels = tuple(k for k in (kernels or SPARSE_KERNELS.names()) if SPARSE_KERNELS.get(k).available())
    if "dense" not in kernels:
        kernels = ("dense",) + kernels
    log.info("calibrating sparse kernels %s with %d threads", kernels, torch.get_num_threads())
    with torch.inference_mode():
        linear = _calibrate_linear(kernels, reps, sizes, batches)
        unfold, per_mac, overhead = _calibrate_conv(reps)
    return Calibration(machine_key(kernels), torch.get_num_threads(), linear, unfold, per_mac, overhead)


def cache_path(kernels: tuple[str, ...], directory: str | Path | None = None) -> Path:
    base = Path(directory) if directory else cpp_kernel.cache_dir()
    return base / f"calibration-{machine_key(kernels)}.json"


def _number(value, what: str, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (value <= 0 if positive else value < 0)
    ):
        raise ValueError(f"{what} must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _checked(data, kernels: tuple[str, ...]) -> dict:
    """``data`` if it is a calibration of exactly these kernels on this machine, else ``ValueError`` saying why."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if data.get("key") != machine_key(kernels):
        raise ValueError(f"key {data.get('key')!r} is not this machine's ({machine_key(kernels)})")
    if isinstance(data.get("threads"), bool) or not isinstance(data.get("threads"), int):
        raise ValueError(f"threads must be an integer, got {data.get('threads')!r}")
    linear = data.get("linear")
    if not isinstance(linear, dict) or set(linear) != set(kernels):
        raise ValueError(f"linear must map exactly the kernels {list(kernels)}")
    for kernel, table in linear.items():
        if not isinstance(table, dict) or not table:
            raise ValueError(f"linear.{kernel} must be a non-empty object of batches")
        for batch, points in table.items():
            if not (isinstance(batch, str) and batch.isdigit() and int(batch) > 0):
                raise ValueError(f"linear.{kernel}: batch {batch!r} is not a positive integer")
            if (
                not isinstance(points, list)
                or not points
                or not all(isinstance(p, list) and len(p) == 2 for p in points)
            ):
                raise ValueError(f"linear.{kernel}.{batch} must be a non-empty list of [work, ms] pairs")
            for work, ms in points:
                _number(work, f"linear.{kernel}.{batch} work", positive=True)
                _number(ms, f"linear.{kernel}.{batch} ms", positive=True)
    for name in ("unfold_ms_per_elem", "conv_dense_ms_per_mac", "conv_dense_overhead_ms"):
        _number(data.get(name), name)
    return data


MAX_CACHE_BYTES = 1 << 20  # a calibration is a few KiB; a larger file is not one of ours


def _load(path: Path, kernels: tuple[str, ...]) -> Calibration | None:
    """The calibration cached at ``path``, or ``None`` (logged) when it is missing, unreadable or malformed."""
    try:
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_CACHE_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than {MAX_CACHE_BYTES}")
        return Calibration.from_json(_checked(json.loads(path.read_text()), kernels))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log.warning("ignoring invalid calibration cache %s (%s: %s); recalibrating", path, type(exc).__name__, exc)
        return None


def _store(path: Path, cal: Calibration) -> None:
    """Write the cache atomically (readers never see a partial file); a cache that cannot be written is skipped."""
    text = json.dumps(cal.to_json(), indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except (OSError, ArtefactError) as exc:
        log.warning("calibration not cached: cannot write %s (%s)", path, exc)
        return
    log.info("calibration written to %s", path)


def load_or_calibrate(
    kernels: tuple[str, ...] | None = None,
    directory: str | Path | None = None,
    recalibrate: bool = False,
    **calibrate_kwargs,
) -> Calibration:
    """The cached calibration for these kernels on this machine, measured first if missing (or asked).

    A cache file that cannot be read or is not a well-formed calibration of these kernels is logged and
    replaced by a fresh calibration; a cache directory that cannot be written costs only the cache."""
    kernels = tuple(k for k in (kernels or SPARSE_KERNELS.names()) if SPARSE_KERNELS.get(k).available())
    kernels = tuple(sorted(set(kernels) | {"dense"}))
    path = cache_path(kernels, directory)
    cal = None if recalibrate else _load(path, kernels)
    if cal is None:
        cal = calibrate(kernels, **calibrate_kwargs)
        _store(path, cal)
    return cal
