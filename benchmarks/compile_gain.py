"""Eager vs ``torch.compile`` step time on small sparsifx models (dense, masked, shrunk; inference and training).

Per row, the eager module and its compiled twin are timed in interleaved rounds in one process (torch 1 thread,
the thread's CPU clock, so other load on the machine does not enter the figure; the wall clock is recorded
beside it); each round times ``--calls`` calls of each, and the table gives the median per call. A training
step is forward, backward and ``optimizer.step()`` with the sparse controller attached (``static`` stage); only
the model is compiled, the optimizer step and the controller's hooks stay eager. The first compiled call
(compile time, with whatever the inductor cache already held) is reported separately.

    python benchmarks/compile_gain.py --out benchmarks/results/compile_gain.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx

if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import harness  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


MODELS = {"mlp 784-300-100-10": (mlp, (64, 784)), "cnn 3-32-64-64": (cnn, (16, 3, 32, 32))}
VARIANTS = {
    "dense": None,
    "masked 90%": {"stages": [{"pass": "magnitude", "sparsity": 0.9}]},
    "shrunk 50%": {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]},
    "train: static 90%": {"stages": [{"pass": "static", "sparsity": 0.9}]},
}


def build(model_fn, shape, recipe) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = model_fn()
    if recipe is not None:
        model = sparsifx.sparsify(model, recipe, example_inputs=(x,))
    return model, x


def inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def step():
        with torch.no_grad():
            return model(x)

    return step


def training_step(gm: nn.Module, forward: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    y = torch.zeros(x.shape[0], dtype=torch.long)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    sparsifx.attach(gm, opt)
    gm.train()

    def step():
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    return step


def measure(name: str, variant: str, backend: str, rounds: int, calls: int) -> dict:
    model_fn, shape = MODELS[name]
    recipe = VARIANTS[variant]
    train = variant.startswith("train")
    eager_model, x = build(model_fn, shape, recipe)
    compiled_model, _ = build(model_fn, shape, recipe)
    compiled = torch.compile(compiled_model, backend=backend)
    if train:
        eager, fast = training_step(eager_model, eager_model, x), training_step(compiled_model, compiled, x)
    else:
        eager, fast = inference_step(eager_model, x), inference_step(compiled, x)
    t0 = time.perf_counter()
    fast()
    compile_s = time.perf_counter() - t0
    for _ in range(3):  # warm both (and any recompilation)
        eager(), fast()
    samples = harness.interleaved_samples(
        {"eager": eager, "compiled": fast}, rounds, calls=calls, clocks=("cpu", "wall")
    )
    med = harness.medians_ms(samples["cpu"])
    wall = harness.medians_ms(samples["wall"])
    return {
        "model": name,
        "variant": variant,
        "mode": "train step" if train else "inference",
        "batch": shape[0],
        "eager_ms": med["eager"],
        "compiled_ms": med["compiled"],
        "speedup": med["eager"] / med["compiled"],
        "eager_wall_ms": wall["eager"],
        "compiled_wall_ms": wall["compiled"],
        "first_call_s": compile_s,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# torch.compile vs eager ({meta['backend']})",
        "",
        f"`{meta['command']}` — torch {meta['torch']}. {harness.load_line(meta)}",
        "",
        f"Median per call of {meta['rounds']} interleaved rounds (shuffled order) x {meta['calls']} calls, on the "
        "calling thread's "
        "CPU clock (wall-clock medians in the JSON). Train step: forward + backward + `optimizer.step()` with "
        "the sparse controller attached; only the model is compiled. First call: compile time (inductor's "
        "on-disk cache may already hold kernels).",
        "",
        "| model | variant | mode | batch | eager ms | compiled ms | eager / compiled | first call s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | | | error: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['mode']} | {r['batch']} | {r['eager_ms']:.3f} | "
            f"{r['compiled_ms']:.3f} | {r['speedup']:.2f} | {r['first_call_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_gain.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = harness.machine(
        clock="cpu",
        command="python benchmarks/compile_gain.py",
        backend=args.backend,
        rounds=args.rounds,
        calls=args.calls,
    )
    rows = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            try:
                rows.append(measure(name, variant, args.backend, args.rounds, args.calls))
            except Exception as exc:  # a row that fails is recorded, the rest still run
                rows.append({"model": name, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(rows[-1], flush=True)
    harness.finish(meta)
    harness.write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, meta))


if __name__ == "__main__":
    main()
