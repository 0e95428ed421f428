"""Benchmark (issue #11): N fuzzed recipes, each under a time and a memory cap; only ``SparsifxError`` may escape.

    python benchmarks/recipe_fuzz.py --n 10000 --out benchmarks/results/recipe_fuzz.json

Input ``i`` is a deterministic function of ``(--seed, i)``: half are Python dicts (real pass names and parameter
names with nasty values: huge integers, nan/inf, long strings, bytes, sets, non-string keys, cycles, deep nesting,
shared-reference bombs), half YAML text (mutated valid recipes, dumps of random recipes, random text, and attacks:
alias bombs, deep nesting, node floods, long scalars, huge integers, unsafe tags). A worker subprocess runs them one
by one through ``Recipe.from_dict`` / ``Recipe.from_yaml`` / ``Recipe.load`` with ``RLIMIT_AS`` set to its size after
warm-up plus ``--mem-cap-mb``, a ``setitimer`` alarm of ``--time-cap`` seconds per input (a hang), and a tracemalloc
peak per input. A worker that dies is restarted after the input that killed it (a crash). Writes the JSON summary
and a markdown table next to it; exits 1 if any input raised something other than a ``SparsifxError``, hung or
crashed.
"""

from __future__ import annotations

import argparse
import inspect
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
import tracemalloc
from collections import Counter
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import harness  # noqa: E402

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

WORDS = [
    "magnitude",
    "fold_bn",
    "rigl",
    "Conv2d",
    "Linear",
    "Conv2dd",
    "erk",
    "uniform",
    "auto",
    "csr",
    "fc",
    "*",
    "layer1.*",
    "",
    "null",
    "1e999",
    "fc_b",
    "kaiming_uniform",
    "cosine",
    "x" * 100,
]
SEED_YAML = [
    "stages:\n  - pass: magnitude\n    sparsity: 0.8\n    distribution: erk\n    ignore: [fc]\n"
    "    by_name: {conv1: {sparsity: 0.3}}\n  - pass: fold_bn\n",
    "name: r\nstages: [{pass: rigl, sparsity: 0.9, delta_t: 100, by_type: {Linear: {sparsity: 0.5}}}]\n",
    "stages: [{pass: lower, backend: auto, cache_dir: /tmp/x, kernels: [csr]}]\n",
    "stages:\n- pass: channel_prune\n  ratio: 0.5\n  round_to: 8\n- pass: shrink\n",
]
TOKENS = [
    "&a ",
    "*a",
    "!!python/object/apply:os.system ['true'] ",
    "!!binary ",
    "!!set ",
    "!!timestamp ",
    "!foo ",
    "<<: ",
    "? ",
    "[" * 40,
    "{" * 40,
    "]",
    "}",
    ": ",
    "- ",
    "\n  ",
    "\t",
    "\x00",
    "'",
    '"',
    "#",
    "1e999",
    ".nan",
    ".inf",
    "9" * 5000,
    "0x" + "f" * 3000,
    "2024-01-01",
    "~",
    "%YAML 1.1\n---\n",
    "\n---\n",
    "\ufeff",
    "|\n  ",
    ">-\n  ",
    "1:2:3:4:5",
    "!!int ",
    "!!float ",
]


# --- deterministic generator ----------------------------------------------------------------------------------------
def pass_keys() -> dict[str, list[str]]:
    from sparsifx.passes.training.dst_base import MaskConfig
    from sparsifx.registry import PASSES
    from sparsifx.selection import SELECTION_KEYS

    out = {}
    for name in PASSES.names():
        params = list(inspect.signature(PASSES.get(name).__init__).parameters)[1:]
        extra = (list(MaskConfig.FIELDS) if "mask" in params else []) + (
            list(SELECTION_KEYS) if "selection" in params else []
        )
        out[name] = sorted(set(params) - {"selection", "mask"} | set(extra))
    return out


def scalar(rng: random.Random, plain: bool):
    r = rng.random()
    if r < 0.2:
        return rng.randint(-5, 300)
    if r < 0.3:
        return (
            rng.choice([2**63, -(2**63) - 1, 2**64, 10**400]) if rng.random() < 0.8 else 10 ** rng.choice([5000, 10000])
        )
    if r < 0.45:
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 0.5, 0.9, 0.999, 1.0, 1.5, -1.0])
    if r < 0.55:
        return rng.choice([True, False, None])
    if r < 0.8:
        return rng.choice(WORDS)
    if r < 0.9:
        return "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 20)))
    if r < 0.95 or plain:
        return "x" * rng.choice([5000, 9000, 100_000, 2_000_000])
    return rng.choice([b"bytes", {1, 2}, frozenset(), object(), 1 + 2j, range(3)])


def key(rng: random.Random, names: list[str], plain: bool):
    r = rng.random()
    if r < 0.7 and names:
        return rng.choice(names)
    if r < 0.85 or plain:
        return rng.choice(WORDS + ["pass", "selection", "mask", "k" * 9000])
    return rng.choice([1, -1, None, True, 0.5, float("nan"), (1, 2), ("a",), 10**400])


def nasty(rng: random.Random, names: list[str], depth: int = 0, plain: bool = False):
    if depth > 3 or rng.random() < 0.55:
        return scalar(rng, plain)
    r = rng.random()
    if r < 0.35:
        return [nasty(rng, names, depth + 1, plain) for _ in range(rng.randint(0, 4))]
    if r < 0.7:
        return {key(rng, names, plain): nasty(rng, names, depth + 1, plain) for _ in range(rng.randint(0, 4))}
    if r < 0.78 and not plain:
        return tuple(nasty(rng, names, depth + 1, plain) for _ in range(rng.randint(0, 3)))
    if r < 0.86:  # deep nesting, built without recursion
        value = nasty(rng, names, 4, plain)
        for _ in range(rng.choice([31, 33, 100, 10_000, 100_000])):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    if r < 0.93:  # a DAG of shared references: 'billion laughs' in Python
        value = ["lol"] * rng.randint(2, 10)
        for _ in range(rng.randint(2, 12)):
            value = [value] * rng.randint(2, 10)
        return value
    if plain:
        return [1, 2]
    cyc: dict | list = {} if rng.random() < 0.5 else []
    if isinstance(cyc, dict):
        cyc["self"] = cyc
    else:
        cyc.append(cyc)
    return cyc


def dict_recipe(rng: random.Random, keys_of: dict[str, list[str]], plain: bool = False):
    if rng.random() < 0.1:
        return nasty(rng, [], plain=plain)
    stages = []
    for _ in range(rng.randint(0, 4) if rng.random() < 0.2 else rng.randint(1, 3)):
        name = rng.choice(list(keys_of)) if rng.random() < 0.9 else scalar(rng, plain)
        names = keys_of.get(name, []) if isinstance(name, str) else []
        stage = {"pass": name} if rng.random() < 0.95 else {}
        for _ in range(rng.randint(0, 4)):
            stage[key(rng, names, plain)] = nasty(rng, names, 1, plain)
        stages.append(stage if rng.random() < 0.9 else nasty(rng, names, 1, plain))
    recipe = {"stages": stages}
    if rng.random() < 0.2:
        recipe[key(rng, ["name", "description", "stagse"], plain)] = nasty(rng, [], 1, plain)
    return recipe


def yaml_safe(value, budget: list[int], depth: int = 0):
    """A copy yaml.safe_dump can write: string keys, lists for tuples/sets, at most ``budget[0]`` values in all."""
    budget[0] -= 1
    if depth > 30 or budget[0] < 0:
        return 0
    if isinstance(value, dict):
        return {str(k)[:50]: yaml_safe(v, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [yaml_safe(v, budget, depth + 1) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4000:
        return 2**64
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(type(value))


def mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(0, 4)):
        pos = rng.randint(0, len(text))
        action = rng.random()
        if action < 0.4:
            text = text[:pos] + rng.choice(TOKENS) + text[pos:]
        elif action < 0.6:
            text = text[:pos] + text[pos + rng.randint(1, 20) :]
        elif action < 0.8:
            text = text[:pos] + text[pos : pos + 40] * rng.randint(2, 50) + text[pos:]
        else:
            text = text[:pos] + "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(1, 10))) + text[pos:]
    return text


def yaml_attack(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:  # billion laughs, various shapes
        width, depth = rng.randint(2, 20), rng.randint(3, 12)
        lines = ["a0: &a0 [" + ",".join(["lol"] * width) + "]"]
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, depth)]
        return "\n".join(lines) + f"\nstages: [{{pass: magnitude, sparsity: *a{depth - 1}}}]\n"
    if kind == 1:
        n = rng.choice([33, 1000, 100_000])
        return "stages: " + "[" * n + "]" * n
    if kind == 2:
        return "stages: [" + ",".join(["{pass: fold_bn}"] * rng.choice([100, 10_001, 60_000])) + "]"
    if kind == 3:
        return "stages: [{pass: magnitude, distribution: " + "e" * rng.choice([8192, 8193, 1 << 20, 2 << 20]) + "}]"
    if kind == 4:
        return (
            "stages: [{pass: static, seed: "
            + rng.choice(
                [
                    "9" * rng.choice([19, 4300, 4301, 100_000]),
                    "0x" + "f" * rng.choice([16, 100_000]),
                    ":".join(["59"] * 3000),
                ]
            )
            + "}]"
        )
    if kind == 5:
        tag = rng.choice(
            [
                "!!python/object/apply:os.system ['true']",
                "!!binary aGVsbG8=",
                "!!set {a, b}",
                "!!timestamp 2001-12-14",
                "!!omap [a: 1]",
                "!foo bar",
                "!!python/name:os.system",
            ]
        )
        return f"stages: [{{pass: magnitude, sparsity: {tag}}}]"
    if kind == 6:
        return "".join(chr(rng.randint(0, 255)) for _ in range(rng.randint(0, 2000)))
    if kind == 7:
        return "%YAML 1.1\n---\nstages: [{pass: fold_bn}]\n---\n" * rng.randint(1, 1000)
    return "stages:\n" + "".join(f"{'  ' * i}- \n" for i in range(rng.choice([10, 40, 500])))


def make_input(seed: int, i: int, keys_of: dict[str, list[str]]):
    """(kind, entry point, payload) of input ``i``: the same for the same (seed, i) on every run."""
    rng = random.Random(f"{seed}:{i}")
    r = rng.random()
    if r < 0.5:
        return "dict", ("load" if rng.random() < 0.2 else "from_dict"), dict_recipe(rng, keys_of)
    entry = "load" if rng.random() < 0.2 else "from_yaml"
    if r < 0.65:
        return "yaml-mutated", entry, mutate(rng, rng.choice(SEED_YAML))
    if r < 0.8:
        text = yaml.dump(yaml_safe(dict_recipe(rng, keys_of, plain=True), [5_000]), Dumper=DUMPER, allow_unicode=True)
        return "yaml-dump", entry, mutate(rng, text)
    if r < 0.9:
        return "yaml-attack", entry, yaml_attack(rng)
    return "yaml-random", entry, "".join(chr(rng.randint(1, 0x7F)) for _ in range(rng.randint(0, 300)))


# --- worker -------------------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in the code under test swallows it."""


def _alarm(signum, frame):
    raise Hang()


def worker(args) -> None:
    from sparsifx import Recipe
    from sparsifx.errors import RecipeError, SparsifxError

    keys_of = pass_keys()
    for text in SEED_YAML:  # warm-up: imports of every pass and backend happen here, not in a timed input
        Recipe.from_yaml(text)
    vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize:"))) * 1024
    cap = vm + args.mem_cap_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    signal.signal(signal.SIGALRM, _alarm)
    for i in range(args.start, args.end):
        kind, entry, payload = make_input(args.seed, i, keys_of)  # untraced: full speed, not in the peak
        fn = getattr(Recipe, entry)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        outcome = "accepted"
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.time_cap)
        try:
            fn(payload)
        except Hang:
            outcome = "hang"
        except RecipeError:
            outcome = "RecipeError"
        except SparsifxError as exc:
            outcome = f"SparsifxError:{type(exc).__name__}"
        except BaseException as exc:  # noqa: BLE001 - the thing this benchmark counts
            outcome = f"other:{type(exc).__name__}:{str(exc)[:120]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        del payload
        print(
            json.dumps({"i": i, "kind": kind, "entry": entry, "outcome": outcome, "s": seconds, "peak": peak}),
            flush=True,
        )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"done": True, "maxrss_kib": usage.ru_maxrss, "as_cap": cap}), flush=True)


# --- driver -------------------------------------------------------------------------------------------------------
def run_all(args) -> tuple[list[dict], list[dict]]:
    rows, workers, start = [], [], args.start
    while start < args.n:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--start",
            str(start),
            "--end",
            str(args.n),
            "--seed",
            str(args.seed),
            "--time-cap",
            str(args.time_cap),
            "--mem-cap-mb",
            str(args.mem_cap_mb),
        ]
        err = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            row = json.loads(line)
            if row.get("done"):
                workers.append(row)
            else:
                rows.append(row)
                start = row["i"] + 1
        proc.wait()
        if start < args.n and proc.returncode != 0:  # the worker died on input `start`
            err.seek(0)
            tail = err.read()[-300:].replace("\n", " | ")
            rows.append(
                {
                    "i": start,
                    "kind": "?",
                    "entry": "?",
                    "outcome": f"crash:rc={proc.returncode}: {tail}",
                    "s": None,
                    "peak": None,
                }
            )
            start += 1
        elif start < args.n:
            raise RuntimeError(f"worker stopped early at input {start}")
    return rows, workers


def summarise(rows: list[dict], workers: list[dict], args, load_start, load_end, wall: float) -> dict:
    outcomes = Counter(
        r["outcome"].split(":")[0] if r["outcome"].startswith(("other", "crash")) else r["outcome"] for r in rows
    )
    timed = [r for r in rows if r["s"] is not None]
    slowest = max(timed, key=lambda r: r["s"])
    largest = max(timed, key=lambda r: r["peak"])
    by_kind: dict[str, Counter] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], Counter())[r["outcome"].split(":")[0]] += 1
    return {
        "command": "python benchmarks/recipe_fuzz.py " + " ".join(sys.argv[1:]),
        "count": len(rows),
        "accepted": outcomes["accepted"],
        "recipe_error": outcomes["RecipeError"],
        "other_sparsifx_error": sum(n for k, n in outcomes.items() if k.startswith("SparsifxError")),
        "other_exceptions": outcomes["other"],
        "hangs": outcomes["hang"],
        "crashes": outcomes["crash"],
        "other_exception_examples": [r for r in rows if r["outcome"].startswith(("other", "crash"))][:20],
        "max_seconds": slowest["s"],
        "max_seconds_input": {k: slowest[k] for k in ("i", "kind", "entry")},
        "max_tracemalloc_peak_bytes": largest["peak"],
        "max_peak_input": {k: largest[k] for k in ("i", "kind", "entry")},
        "worker_maxrss_kib": max((w["maxrss_kib"] for w in workers), default=None),
        "mean_ms": 1000 * sum(r["s"] for r in timed) / len(timed),
        "time_cap_s": args.time_cap,
        "mem_cap_mb_over_warm_worker": args.mem_cap_mb,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "wall_s": wall,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }


def markdown(s: dict) -> str:
    kinds = sorted({o for v in s["by_kind"].values() for o in v})
    lines = [
        "# Recipe fuzzing (issue #11: recipes are untrusted input)",
        "",
        f"`{s['command']}` — {s['machine']}; load average {s['loadavg_start']} at start, {s['loadavg_end']} at end "
        f"(a shared machine); wall {s['wall_s']:.0f} s. Each input runs in a worker with RLIMIT_AS = its size after "
        f"warm-up + {s['mem_cap_mb_over_warm_worker']} MiB and a {s['time_cap_s']} s alarm (a hang). Memory is the "
        "tracemalloc peak of the call above what was alive before it (Python allocations; libyaml's C buffers are "
        "bounded by the 1 MiB text cap and covered by RLIMIT_AS). Times are measured with tracemalloc on, which "
        "slows allocation-heavy inputs several-fold; inputs are generated outside the measured call.",
        "",
        "| inputs | accepted | RecipeError | other SparsifxError | other exceptions | hangs | crashes | "
        "max time / input | max memory / input | mean time |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['count']} | {s['accepted']} | {s['recipe_error']} | {s['other_sparsifx_error']} | "
        f"{s['other_exceptions']} | {s['hangs']} | {s['crashes']} | {1000 * s['max_seconds']:.1f} ms "
        f"(#{s['max_seconds_input']['i']}, {s['max_seconds_input']['kind']}) | "
        f"{s['max_tracemalloc_peak_bytes'] / 2**20:.2f} MiB (#{s['max_peak_input']['i']}, "
        f"{s['max_peak_input']['kind']}) | {s['mean_ms']:.2f} ms |",
        "",
        f"Worker peak RSS: {s['worker_maxrss_kib'] / 1024:.0f} MiB (torch and sparsifx imported).",
        "",
        "| input kind | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    lines += [f"| {k} | " + " | ".join(str(v.get(o, 0)) for o in kinds) + " |" for k, v in s["by_kind"].items()]
    if s["other_exception_examples"]:
        lines += ["", "Other exceptions / crashes:", ""] + [
            f"- #{r['i']} {r['kind']}: {r['outcome']}" for r in s["other_exception_examples"]
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-cap", type=float, default=5.0, help="seconds per input before it counts as a hang")
    ap.add_argument("--mem-cap-mb", type=int, default=1024, help="address space a worker may add after warm-up")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/recipe_fuzz.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--end", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    load_start, t0 = harness.load_average(), time.perf_counter()
    rows, workers = run_all(args)
    summary = summarise(rows, workers, args, load_start, harness.load_average(), time.perf_counter() - t0)
    harness.write_results(args.out, summary, markdown(summary), trailing_newline=True)
    print(markdown(summary))
    return 1 if summary["other_exceptions"] or summary["hangs"] or summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
