"""Parameter checks for pass constructors: each raises ``RecipeError`` naming the parameter."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from .errors import RecipeError


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A real number in [lo, hi] (open ends where asked)."""
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    allowed = f"a number in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError("must be a number", name, value, allowed)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise RecipeError("out of range", name, value, allowed)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise RecipeError("out of range", name, value, allowed)
    return float(value)


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    allowed = f"an integer in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError("must be an integer", name, value, allowed)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RecipeError("out of range", name, value, allowed)
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = list(options)
    if value not in options:
        raise RecipeError("unknown value", name, value, ", ".join(map(str, options)))
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError("must be true or false", name, value, "true, false")
    return value


def string_list(name: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings, returned as a tuple."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise RecipeError("must be a string or a list of strings", name, value, "e.g. [conv1, 'layer4.*']")
    return tuple(value)


def mapping(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise RecipeError("must be a mapping", name, value, "a mapping of keys to values")
    return value
