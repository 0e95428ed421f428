"""Parameter checks for pass constructors: each raises ``RecipeError`` naming the parameter.

Values in error messages go through ``shown``: a value too large to print (a 10**10000 integer, a
megabyte string, a deep or self-referencing container) is replaced by a bounded summary.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any, Iterable

from .errors import RecipeError

_SHOWN_CHARS = 200


class _BoundedRepr(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 80, 80
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 8

    def repr_int(self, x, level):
        return repr(x) if x.bit_length() <= 128 else f"<integer of {x.bit_length()} bits>"


class Shown:
    """A value too large to show, standing in for it in a ``RecipeError``; ``repr`` is a bounded summary."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def shown(value: Any) -> Any:
    """``value`` itself when it prints in at most ~200 characters, else a ``Shown`` summary of it."""
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 128 else Shown(f"<integer of {value.bit_length()} bits>")
    if isinstance(value, str):
        return value if len(value) <= _SHOWN_CHARS else Shown(f"{value[:40]!r}... ({len(value)} characters)")
    try:
        text = _BoundedRepr().repr(value)
    except Exception:  # a hostile __repr__
        text = f"<{type(value).__name__}>"
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return value if isinstance(value, (list, tuple, dict)) and "..." not in text else Shown(text)


def number(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A real finite number in [lo, hi] (open ends where asked)."""
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    allowed = f"a number in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError("must be a number", name, shown(value), allowed)
    if isinstance(value, int) and value.bit_length() > 1000:  # beyond float range: float() would overflow
        raise RecipeError("out of range", name, shown(value), allowed)
    if not math.isfinite(value):
        raise RecipeError("must be a finite number", name, shown(value), allowed)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise RecipeError("out of range", name, shown(value), allowed)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise RecipeError("out of range", name, shown(value), allowed)
    return float(value)


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    allowed = f"an integer in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError("must be an integer", name, shown(value), allowed)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RecipeError("out of range", name, shown(value), allowed)
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = list(options)
    if not isinstance(value, str) or value not in options:
        raise RecipeError("unknown value", name, shown(value), ", ".join(map(str, options)))
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError("must be true or false", name, shown(value), "true, false")
    return value


def string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RecipeError("must be a string", name, shown(value), "a string")
    return value


def string_list(name: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings, returned as a tuple."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecipeError("must be a string or a list of strings", name, shown(value), "e.g. [conv1, 'layer4.*']")
    return tuple(value)


def mapping(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise RecipeError("must be a mapping", name, shown(value), "a mapping of keys to values")
    return value


# --- checks from a constructor's annotations ---------------------------------------------------------------------
def _null(name: str, value: Any) -> None:
    if value is not None:
        raise RecipeError("must be null", name, shown(value), "null")


def _sequence(name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)):
        raise RecipeError("must be a list", name, shown(value), "a list")


def _callable(name: str, value: Any) -> None:
    if not callable(value):
        raise RecipeError(
            "must be a callable (recipes cannot hold code)",
            name,
            shown(value),
            "null in a recipe; a function from Python",
        )


_BY_ANNOTATION = {
    "int": lambda name, v: integer(name, v),
    "float": lambda name, v: number(name, v),
    "bool": boolean,
    "str": string,
    "None": _null,
    "Sequence": _sequence,
    "Callable": _callable,
}


def _alternatives(annotation: Any) -> list[str]:
    """``"int | None"`` -> ``["int", "None"]`` (split at top-level ``|``); ``Callable[...]`` -> ``Callable``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text + "|"):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    heads = [p.split("[")[0].rsplit(".", 1)[-1] for p in parts]
    return [h if h in ("Callable", "Sequence") else p for p, h in zip(parts, heads)]


def annotated(name: str, value: Any, annotation: Any) -> None:
    """Check ``value`` against a simple constructor annotation (``int``, ``float | None``, ``Callable[...]``).

    Only annotations made of ``int``, ``float``, ``bool``, ``str``, ``None``, ``Sequence[...]`` and
    ``Callable[...]`` are checked; anything else (``list``, a config class) is left to the constructor. When
    ``value`` matches no alternative, the error is that of the first one that is not ``None``.
    """
    kinds = _alternatives(annotation)
    if not all(kind in _BY_ANNOTATION for kind in kinds):
        return
    errors = []
    for kind in kinds:
        try:
            _BY_ANNOTATION[kind](name, value)
            return
        except RecipeError as exc:
            errors.append((kind, exc))
    raise next((exc for kind, exc in errors if kind != "None"), errors[0][1])
