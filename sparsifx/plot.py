"""``plot_reports(after, path, before=None)``: per-layer parameters, density and MACs as a figure file.

Top panel: per layer, a bar of parameters (outline) filled up to the non-zeros, for the model before (grey) and
after (blue) a recipe, with each layer's density (non-zeros / parameters) as markers on the right axis. Bottom
panel: MACs per layer, dense (outline) filled up to the sparse MACs (MACs scaled by weight density). Without a
``before`` report only the "after" bars are drawn; a report without shapes gets a note instead of MACs.
Layers are matched by name (``shrink`` keeps names); past ``max_layers`` only the largest layers are drawn,
in model order, and the title says how many were left out. The y axes are logarithmic when layer sizes span
more than two decades.

matplotlib is an optional dependency (``pip install sparsifx[plot]``); without it :class:`PlotError` says so.
The figure is drawn on a bare ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend) and written
atomically (``sparsifx.atomic_io.atomic_write``); the format follows the file suffix (png, svg, pdf, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .atomic_io import atomic_write
from .errors import SparsifxError

if TYPE_CHECKING:
    from .reporting import Report

BEFORE, AFTER = "#9e9e9e", "#1f77b4"


class PlotError(SparsifxError):
    """A figure cannot be drawn: matplotlib is missing, or the file format or the reports are unusable."""


def require_matplotlib():
    """matplotlib's ``Figure`` class, or :class:`PlotError` saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotError("plotting needs matplotlib, which is not installed: pip install sparsifx[plot]") from exc
    return Figure


def _rows(after: "Report", before: "Report | None", max_layers: int) -> tuple[list[str], int]:
    names = [r.name for r in after.layers]
    if before is not None:
        names += [r.name for r in before.layers if r.name not in set(names)]
    if len(names) <= max_layers:
        return names, 0

    def size(name: str) -> int:
        return max(_get(rep, name, "params") + (_get(rep, name, "macs") or 0) for rep in (after, before) if rep)

    keep = set(sorted(names, key=size, reverse=True)[:max_layers])
    return [n for n in names if n in keep], len(names) - len(keep)


def _get(rep: "Report | None", name: str, attr: str):
    """``attr`` of layer ``name`` in ``rep`` (0 when the report or the layer is absent)."""
    row = None if rep is None else next((r for r in rep.layers if r.name == name), None)
    return 0 if row is None else getattr(row, attr)


def _maybe_log(ax, values: Sequence[float]) -> None:
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


def _offsets(x: list[int], i: int, n: int, width: float) -> list[float]:
    return [v + (i - (n - 1) / 2) * width for v in x]


def _bars(
    ax,
    x,
    width: float,
    reports: list[tuple[str, "Report", str]],
    names: list[str],
    total: str,
    filled: str,
    ylabel: str,
) -> None:
    """Outline bars of ``total`` filled up to ``filled``, one series per (label, report, colour)."""
    seen: list[float] = []
    for i, (label, rep, colour) in enumerate(reports):
        pos = _offsets(x, i, len(reports), width)
        tot = [_get(rep, name, total) or 0 for name in names]
        fill = [_get(rep, name, filled) or 0 for name in names]
        ax.bar(pos, tot, width, facecolor="none", edgecolor=colour, linewidth=0.8)
        ax.bar(pos, fill, width, color=colour, alpha=0.85, label=label)
        seen += tot + fill
    ax.set_ylabel(ylabel)
    _maybe_log(ax, seen)


def _densities(ax, x, width: float, reports: list[tuple[str, "Report", str]], names: list[str]) -> None:
    """Each layer's density (non-zeros / parameters) as markers on a right-hand axis; legend above ``ax``."""
    dens = ax.twinx()
    for i, (label, rep, colour) in enumerate(reports):
        pts = [
            (p, 1.0 - _get(rep, name, "sparsity"))
            for p, name in zip(_offsets(x, i, len(reports), width), names)
            if _get(rep, name, "params")
        ]
        if pts:
            dens.plot(
                *zip(*pts),
                linestyle="none",
                marker="o",
                markersize=4,
                markeredgecolor=colour,
                markerfacecolor=colour if label == "after" else "white",
                label=f"density {label}",
            )
    dens.set_ylim(0, 1.05)
    dens.set_ylabel("density (non-zeros / parameters)")
    bars, more = ax.get_legend_handles_labels(), dens.get_legend_handles_labels()
    ax.legend(
        bars[0] + more[0],
        bars[1] + more[1],
        fontsize="small",
        ncol=4,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        frameon=False,
    )


def draw(after: "Report", before: "Report | None" = None, title: str | None = None, max_layers: int = 60):
    """The figure (a ``matplotlib.figure.Figure``) that :func:`plot_reports` writes."""
    figure_cls = require_matplotlib()
    names, left_out = _rows(after, before, max_layers)
    if not names:
        raise PlotError(f"nothing to plot: the report of {after.model} has no layers")
    reports = ([("before", before, BEFORE)] if before is not None else []) + [("after", after, AFTER)]
    x = list(range(len(names)))
    width = 0.8 / len(reports)
    fig = figure_cls(figsize=(min(max(6.0, 0.28 * len(names) + 2.5), 40.0), 7.5), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    _bars(top, x, width, reports, names, "params", "nonzeros", "parameters (filled: non-zeros)")
    _densities(top, x, width, reports, names)
    if all(rep.total_macs is None for _, rep, _ in reports):
        bottom.text(
            0.5,
            0.5,
            "no MACs: the report has no shapes (pass example inputs)",
            ha="center",
            va="center",
            transform=bottom.transAxes,
        )
        bottom.set_yticks([])
    else:
        _bars(bottom, x, width, reports, names, "macs", "sparse_macs", "MACs (filled: sparse MACs)")
        bottom.legend(fontsize="small", ncol=2, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=90, fontsize=7 if len(names) > 20 else 8)
    bottom.set_xlim(-0.6, len(names) - 0.4)
    head = title or f"sparsifx: {after.model}"
    summary = "\n".join(_summary(label, rep) for label, rep, _ in reports)
    if left_out:
        summary += f"\n{left_out} smaller layers not drawn"
    fig.suptitle(f"{head}\n{summary}", fontsize=10)
    return fig


def _summary(label: str, rep: "Report") -> str:
    text = f"{label}: {_short(rep.total_nonzeros)} of {_short(rep.total_params)} params non-zero"
    if rep.total_macs is not None:
        text += f", MACs {_short(rep.total_macs)} (sparse {_short(rep.total_sparse_macs)})"
    return text


def _short(n: int | None) -> str:
    from .reporting import _human

    return _human(n)


def check_target(path: str | os.PathLike) -> str:
    """The figure format of ``path`` (its suffix), or :class:`PlotError` when matplotlib is missing or cannot
    write that format; lets a caller fail before long work."""
    fmt = Path(path).suffix.lstrip(".").lower()
    supported = require_matplotlib()().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise PlotError(
            f"cannot write a figure as '{Path(path).name}': the suffix must be one of "
            f"{', '.join('.' + k for k in sorted(supported))}"
        )
    return fmt


def plot_reports(
    after: "Report",
    path: str | os.PathLike,
    before: "Report | None" = None,
    title: str | None = None,
    max_layers: int = 60,
) -> Path:
    """Draw ``after`` (and ``before``, optional) as described in the module docstring and write ``path``."""
    path = Path(path)
    fmt = check_target(path)
    if not isinstance(max_layers, int) or max_layers < 1:
        raise PlotError(f"max_layers must be a positive integer, got {max_layers!r}")
    fig = draw(after, before, title=title, max_layers=max_layers)

    def check(tmp: Path) -> None:
        if tmp.stat().st_size == 0:
            raise PlotError(f"matplotlib wrote an empty file for {path}")

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt), check)
