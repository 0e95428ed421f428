"""What every benchmark script shares: interleaved timing, onnxruntime sessions, machine facts, result files.

The scripts import it one way, as a package module::

    from benchmarks import harness

which works both when a script is run as ``python benchmarks/<script>.py`` (each script starts with the
two-line ``__package__`` bootstrap below, which puts the repository root on ``sys.path``) and when a test
imports ``benchmarks.<script>``::

    if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
        sys.path[0] = str(Path(__file__).resolve().parents[1])

Timing (``interleaved_samples``, ``interleaved_ms``, ``timed_calls``): every function is called in rounds, in a
freshly shuffled order each round, after warm-up, so slow drift in the machine's speed hits all of them alike;
the figure is the median. Clocks: ``"cpu"`` (``time.thread_time``: the calling thread's CPU time, for
single-threaded work; other load on the machine does not enter it), ``"wall"`` (``time.perf_counter``), ``"cuda"``
(CUDA events, synchronised), or any callable returning seconds.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}
STEADY_BLOCK = 4  # calls per function and round in ``interleaved_ms``; the first refills the caches others evicted


# ------------------------------------------------------------------ clocks
class _CudaTimer:
    """start/stop around one call with CUDA events; ``stop`` synchronises and returns seconds."""

    def start(self):
        import torch

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin, end

    def stop(self, token) -> float:
        begin, end = token
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


class _ClockTimer:
    def __init__(self, clock: Callable[[], float]):
        self.clock = clock

    def start(self) -> float:
        return self.clock()

    def stop(self, token: float) -> float:
        return self.clock() - token


def _timer(clock: str | Callable[[], float]):
    if clock == "cuda":
        return _CudaTimer()
    if isinstance(clock, str):
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock '{clock}'; known: cpu, wall, cuda")
        return _ClockTimer(CLOCKS[clock])
    return _ClockTimer(clock)


def _clock_name(clock: str | Callable[[], float]) -> str:
    return clock if isinstance(clock, str) else getattr(clock, "__name__", "custom")


# ------------------------------------------------------------------ timing
def timed_calls(fn: Callable[[], Any], n: int, clock: str | Callable[[], float] = "wall") -> list[float]:
    """Seconds of each of ``n`` calls of ``fn`` in a row (one function: nothing to interleave)."""
    timer = _timer(clock)
    out = []
    for _ in range(n):
        token = timer.start()
        fn()
        out.append(timer.stop(token))
    return out


def interleaved_samples(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup_rounds: int = 0,
    block: int = 1,
    calls: int = 1,
    clocks: Sequence[str | Callable[[], float]] = ("wall",),
    seed: int | None = 0,
    before_round: Callable[[int], Any] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each fn, ``{clock name: {key: [one sample per timed block entry]}}``.

    ``warmup_rounds + rounds`` rounds; each calls ``before_round(r)`` (e.g. to draw the round's batch), shuffles
    the functions (``random.Random(seed)``; ``seed=None``: unseeded) and runs each ``block`` times in a row. A
    sample is ``calls`` calls timed together, divided by ``calls``, on every clock of ``clocks`` at once. The
    samples of the warm-up rounds are dropped, and with ``block > 1`` the first sample of every block too (it
    refills the caches the other functions evicted)."""
    timers = {_clock_name(c): _timer(c) for c in clocks}
    if len(timers) != len(clocks):
        raise ValueError(f"clocks need distinct names: {[_clock_name(c) for c in clocks]}")
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in fns} for name in timers}
    order, rng = list(fns.items()), random.Random(seed)
    for r in range(warmup_rounds + rounds):
        if before_round is not None:
            before_round(r)
        rng.shuffle(order)
        for key, fn in order:
            for i in range(block):
                tokens = {name: t.start() for name, t in timers.items()}
                for _ in range(calls):
                    fn()
                spent = {name: timers[name].stop(tok) for name, tok in reversed(list(tokens.items()))}
                if r >= warmup_rounds and (i or block == 1):
                    for name, s in spent.items():
                        times[name][key].append(s / calls)
    return times


def medians_ms(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``{key: median milliseconds}`` of ``{key: [seconds]}``."""
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def paired_ratio_ci(
    num: Sequence[float], den: Sequence[float], level: float = 0.95, boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(median, low, high)`` of the per-round ratios ``num[i] / den[i]`` of two interleaved functions (one pair
    per round: the drift of the machine between rounds cancels), with a percentile-bootstrap interval of the
    median at ``level``."""
    ratios = [a / b for a, b in zip(num, den)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(boot))
    tail = (1 - level) / 2
    lo, hi = meds[int(tail * (boot - 1))], meds[int((1 - tail) * (boot - 1))]
    return statistics.median(ratios), lo, hi


def interleaved_ms(
    fns: Mapping[str, Callable[[], Any]],
    budget_s: float = 6.0,
    min_rounds: int = 5,
    max_rounds: int = 40,
    clock: str | Callable[[], float] = "wall",
    block: int = STEADY_BLOCK,
) -> dict[str, float]:
    """Median milliseconds per call of each fn in its steady state, measured in interleaved rounds: each
    round runs every fn ``block`` times in a row, in a freshly shuffled order, and times all calls but the
    first of each block (with ``block=1``, every call). Interleaving cancels slow drift in the machine's
    speed. The untimed first call matters: right after a large model, a small one first refills the caches
    (measured: pruned mobilenet_v2 on onnxruntime 1.72 ms on that call, 1.40-1.45 ms when it runs again),
    which a model serving requests back to back does not pay. One warm-up call each, then one more call each
    sizes the number of rounds to ``budget_s`` (within ``min_rounds``..``max_rounds``). ``clock``: wall clock
    by default, ``"cpu"`` for single-threaded work."""
    for fn in fns.values():  # warm-up
        fn()
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    per_round = max(time.perf_counter() - t0, 1e-6) * block
    rounds = int(min(max_rounds, max(min_rounds, budget_s / per_round)))
    samples = interleaved_samples(fns, rounds, block=block, clocks=(clock,))
    return {k: statistics.median([s * 1e3 for s in v]) for k, v in samples[_clock_name(clock)].items()}


# ------------------------------------------------------------------ onnxruntime
def ort_session(model: str | Path | bytes, threads: int = 1, profile_prefix: str | None = None):
    """A CPU onnxruntime session of an ONNX file (path) or serialized model (bytes): ``threads`` intra-op
    threads, one inter-op thread, no spin-waiting. With ``profile_prefix``, onnxruntime's profiler writes
    per-kernel times there."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # no spin-waiting after a run: idle pool threads would steal the cores from whatever runs next
    # (the other model of an interleaved pair, or torch), skewing every ratio measured that way
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_feed(session, inputs: Iterable) -> dict[str, Any]:
    """``{input name: numpy array}`` of torch tensors (or arrays), in the session's input order."""
    return {i.name: (x.numpy() if hasattr(x, "numpy") else x) for i, x in zip(session.get_inputs(), inputs)}


# ------------------------------------------------------------------ machine facts and result files
def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(threads: int | None = None, clock: str | None = None, **extra: Any) -> dict:
    """Facts for a result's ``meta``: machine, CPUs, torch, threads, clock and the load average now
    (``load_before``); ``finish(meta)`` adds ``load_after``."""
    import torch

    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
    }
    if clock is not None:
        meta["clock"] = clock
    meta.update(extra)
    meta["load_before"] = load_average()
    return meta


def finish(meta: dict) -> dict:
    meta["load_after"] = load_average()
    return meta


def load_line(meta: Mapping[str, Any]) -> str:
    """One markdown line: machine, threads, clock, load average before and after (what ``machine`` recorded)."""
    parts = [f"{meta.get('machine', platform.machine())}, {meta.get('cpus', os.cpu_count())} CPUs"]
    if "threads" in meta:
        parts.append(f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''}")
    if "clock" in meta:
        parts.append(f"clock: {meta['clock']}")
    parts.append(f"load average {meta.get('load_before')} before, {meta.get('load_after')} after")
    return "Machine: " + "; ".join(parts) + "."


def write_results(
    out: Path,
    payload: Any,
    markdown: str | None = None,
    plot: Callable[[Path], Any] | None = None,
    *,
    trailing_newline: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """``out`` (JSON, indent 1; written whole or not at all: a temporary file renamed), the markdown beside it
    (``.md``) and, with ``plot``, ``plot(out.png)``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=default) + ("\n" if trailing_newline else ""))
    tmp.replace(out)
    if markdown is not None:
        out.with_suffix(".md").write_text(markdown)
    if plot is not None:
        plot(out.with_suffix(".png"))
