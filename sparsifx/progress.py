"""``progress(iterable, desc=...)``: a tqdm bar on stderr for long work, silent unless someone is watching.

The bar is shown only when stderr is a terminal; ``SPARSIFX_PROGRESS=0`` (or ``false``/``no``/``off``) turns it
off everywhere, ``SPARSIFX_PROGRESS=1`` turns it on even when stderr is not a terminal. A silent bar is tqdm's
disabled bar: it yields the iterable unchanged and its ``update``/``set_postfix_str`` do nothing, so callers
never branch on it. Library code never prints; the bar is the one exception the design allows.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
ENV = "SPARSIFX_PROGRESS"
_OFF, _ON = {"0", "false", "no", "off"}, {"1", "true", "yes", "on"}


def enabled() -> bool:
    """Whether a bar would be drawn now (``SPARSIFX_PROGRESS`` first, else whether stderr is a terminal)."""
    flag = os.environ.get(ENV, "").strip().lower()
    if flag in _OFF:
        return False
    if flag in _ON:
        return True
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(
    iterable: Iterable[T] | None = None,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    leave: bool = False,
) -> "tqdm[T]":
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), drawn only when :func:`enabled`."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        file=sys.stderr,
        disable=not enabled(),
        dynamic_ncols=True,
    )
