"""Markdown table (mean ± std over seeds) and accuracy-vs-density plot for ``sparse_training.py`` rows."""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

METRICS = ("accuracy", "flops_ratio", "saved_bytes_ratio", "step_time_ratio")


def _fmt(values: Sequence[float | None], scale: float = 1.0, digits: int = 3) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def group_rows(rows: Iterable[Mapping]) -> dict[tuple, list[Mapping]]:
    """``(model, method, sparsity) -> rows`` over seeds, in first-seen order."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["method"], row["sparsity"])].append(row)
    return groups


def mean_accuracy(rows: Iterable[Mapping], model: str, method: str, sparsity: float) -> float | None:
    vals = [r["accuracy"] for r in rows if r["model"] == model and r["method"] == method
            and abs(r["sparsity"] - sparsity) < 1e-9]
    return statistics.fmean(vals) if vals else None


def markdown_table(rows: Sequence[Mapping], header_lines: Sequence[str]) -> str:
    lines = list(header_lines) + [""]
    lines.append("| model | method | sparsity | seeds | accuracy (%) | flops_ratio | saved_bytes_ratio | step_time_ratio |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for (model, method, sparsity), group in group_rows(rows).items():
        cells = [_fmt([r["accuracy"] for r in group], 100.0, 2)]
        cells += [_fmt([r[k] for r in group]) for k in METRICS[1:]]
        lines.append(f"| {model} | {method} | {sparsity:.2f} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: Sequence[Mapping], path: Path) -> None:
    """One panel per model: mean accuracy (± std) against density, one line per method, dense as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(r["model"] for r in rows))
    sparse_densities = [1.0 - r["sparsity"] for r in rows if r["method"] != "dense"] or [0.1]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    groups = group_rows(rows)
    for ax, model in zip(axes[0], models):
        methods = list(dict.fromkeys(m for (mo, m, _s) in groups if mo == model))
        for method in methods:
            keys = sorted((k for k in groups if k[0] == model and k[1] == method), key=lambda k: -k[2])
            dens = [1.0 - k[2] for k in keys]
            accs = [[100 * r["accuracy"] for r in groups[k]] for k in keys]
            means = [statistics.fmean(a) for a in accs]
            stds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            if method == "dense":
                ax.axhline(means[0], color="black", linestyle="--", label=f"dense ({means[0]:.2f})")
                ax.axhspan(means[0] - stds[0], means[0] + stds[0], color="black", alpha=0.08)
                continue
            ax.errorbar(dens, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xlim(min(sparse_densities) / 1.5, max(max(sparse_densities) * 1.5, 0.3))
        ax.set_xscale("log")
        ticks = sorted(set(sparse_densities))
        ax.set_xticks(ticks, [f"{d:g}" for d in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("density (1 - sparsity), log scale")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
