"""Shape propagation that skips the arithmetic of the heavy ops: moved to ``sparsifx.analysis.shapes`` (the
``shapes`` analysis); this module re-exports it."""

from __future__ import annotations

from .analysis.shapes import HEAVY_FUNCTIONS, HEAVY_MODULES, HeavyOpsOnMeta  # noqa: F401

__all__ = ["HEAVY_FUNCTIONS", "HEAVY_MODULES", "HeavyOpsOnMeta"]
