"""Fuzz ``sparsifx.load`` with mutated save files; count what escapes other than ``SparsifxError``.

    python benchmarks/save_file_fuzz.py --n 2000 --out benchmarks/results/save_file_fuzz.json

Inputs are byte flips, truncations, random bytes spliced into the archive's pickle and structural mutations of
the payload (tests/security/save_mutations.py), in equal shares, from one seed. A worker process loads each file
and, when it loads, builds its report (what ``sparsifx inspect`` does). Each input runs under a time cap
(SIGALRM) and the worker under a memory cap (RLIMIT_DATA above its start-up size); a worker that dies is
counted and restarted at the next input. Writes the JSON and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(HERE.parent)
from benchmarks import harness  # noqa: E402

sys.path.insert(0, str(HERE.parent / "tests" / "security"))  # the mutators of tests/security/save_mutations.py


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def worker(start: int, n: int, seed: int, time_cap: float, mem_cap_mb: int) -> None:
    """Run inputs ``start..n-1``, one JSON line each on stdout."""
    from save_mutations import MUTATIONS, good_file, mutate

    from sparsifx.errors import SparsifxError
    from sparsifx.reporting import report
    from sparsifx.serialization import load

    data, payload = good_file()
    kinds = sorted(MUTATIONS)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limit = (base_kb + mem_cap_mb * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.sfx"
        for i in range(start, n):
            kind = kinds[i % len(kinds)]
            path.write_bytes(mutate(kind, data, payload, random.Random(seed * 1_000_003 + i)))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, time_cap)
            try:
                report(load(path), None)
                outcome = "accepted"
            except SparsifxError as exc:
                outcome = type(exc).__name__
            except _Hang:
                outcome = "hang"
            except MemoryError:
                outcome = "memory cap"
            except Exception as exc:  # what the benchmark counts: must stay zero
                outcome = f"ESCAPED {type(exc).__name__}: {str(exc)[:120]}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            print(
                json.dumps(
                    {
                        "i": i,
                        "kind": kind,
                        "outcome": outcome,
                        "s": time.perf_counter() - t0,
                        "rss_growth_mb": grew_kb / 1024,
                    }
                ),
                flush=True,
            )


def run(n: int, seed: int, time_cap: float, mem_cap_mb: int) -> list[dict]:
    rows: list[dict] = []
    while len(rows) < n:
        start = len(rows)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            str(start),
            "--n",
            str(n),
            "--seed",
            str(seed),
            "--time-cap",
            str(time_cap),
            "--mem-cap-mb",
            str(mem_cap_mb),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 and len(rows) < n:  # the worker died on input len(rows)
            rows.append(
                {
                    "i": len(rows),
                    "kind": "?",
                    "outcome": f"worker died (rc {proc.returncode})",
                    "s": 0.0,
                    "rss_growth_mb": 0.0,
                }
            )
    return rows


def summarise(rows: list[dict]) -> dict:
    by_kind: dict[str, Counter] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], Counter())[
            r["outcome"] if not r["outcome"].startswith("ESCAPED") else "ESCAPED"
        ] += 1
    escaped = [r for r in rows if r["outcome"].startswith(("ESCAPED", "worker died"))]
    return {
        "inputs": len(rows),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "escaped": len(escaped),
        "escaped_examples": escaped[:20],
        "hangs": sum(r["outcome"] == "hang" for r in rows),
        "memory_cap_hits": sum(r["outcome"] == "memory cap" for r in rows),
        "max_seconds": max(r["s"] for r in rows),
        "max_rss_growth_mb": max(r["rss_growth_mb"] for r in rows),
    }


def markdown(summary: dict, meta: dict) -> str:
    outcomes = sorted({o for c in summary["by_kind"].values() for o in c})
    lines = [
        f"# Save-file fuzzing: {summary['inputs']} mutated files",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; load average at start {meta['load_start']}, at end {meta['load_end']}; "
        f"wall time {meta['wall_s']:.0f} s; time cap {meta['time_cap_s']} s per input, memory cap "
        f"{meta['mem_cap_mb']} MB over the worker's start-up size.",
        "",
        "| mutation | " + " | ".join(outcomes) + " |",
        "|---|" + "---|" * len(outcomes),
    ]
    for kind, counts in summary["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in outcomes) + " |")
    lines += [
        "",
        f"- exceptions outside SparsifxError (or worker deaths): **{summary['escaped']}**",
        f"- hangs (over the time cap): **{summary['hangs']}**; memory-cap hits: **{summary['memory_cap_hits']}**",
        f"- slowest input {summary['max_seconds']:.3f} s; largest growth of the worker's peak RSS "
        f"{summary['max_rss_growth_mb']:.1f} MB",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-cap", type=float, default=10.0)
    ap.add_argument("--mem-cap-mb", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "save_file_fuzz.json")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.n, args.seed, args.time_cap, args.mem_cap_mb)
        return
    load_start, t0 = harness.load_average(), time.time()
    rows = run(args.n, args.seed, args.time_cap, args.mem_cap_mb)
    summary = summarise(rows)
    meta = {
        "command": "python benchmarks/save_file_fuzz.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_start": load_start,
        "load_end": harness.load_average(),
        "wall_s": time.time() - t0,
        "time_cap_s": args.time_cap,
        "mem_cap_mb": args.mem_cap_mb,
    }
    harness.write_results(args.out, {"meta": meta, "summary": summary}, markdown(summary, meta))
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
