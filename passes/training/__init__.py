"""Sparse training passes (SWAT, dynamic sparse training) and their controllers."""

from .dst_controller import SparseController, attach, controller  # noqa: E402,F401  (DST controller API)
