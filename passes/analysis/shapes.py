"""Analysis ``shapes``: moved to ``sparsifx.analysis.shapes``; re-exported here."""

from sparsifx.analysis.shapes import record_shapes, shapes, shapes_present  # noqa: F401
