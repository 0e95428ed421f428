"""Recipes are untrusted input: bounded YAML parsing and a bounded walk over recipe data.

Limits (``RecipeLimits``), checked before anything is expanded or built:

- YAML text (a string or a file) of at most ``max_text_bytes`` (1 MiB); a file is measured before it is read.
- No YAML anchors (``&a``) or aliases (``*a``): a ~650-byte "billion laughs" recipe would otherwise expand to
  gigabytes. Recipes are small; repeat the value instead.
- At most ``max_nodes`` values (10,000) and ``max_depth`` nesting levels (32) in all, for YAML (counted on the
  parser's events, before any Python object exists) and for dicts (cycles are refused by object identity).
- Mapping keys are strings; values are plain data: null, booleans, integers within 64 bits, finite floats,
  strings of at most ``max_string`` characters (8192; ``max_total_chars`` 1 MiB over the whole recipe),
  lists (tuples are read as lists) and mappings.

Every refusal is a ``RecipeError`` whose path is ``<yaml>`` for the text, ``<file>`` for the file, or the
key path of the offending value (``stages[0].by_name``).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import RecipeError
from .validate import shown

_SCALARS = frozenset({str, int, float, bool, type(None)})
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same grammar, faster


@dataclass(frozen=True)
class RecipeLimits:
    max_text_bytes: int = 1 << 20
    max_nodes: int = 10_000
    max_depth: int = 32
    max_string: int = 8192
    max_total_chars: int = 1 << 20
    max_int_bits: int = 63  # |n| < 2**63: seeds and step counts fit a C long


LIMITS = RecipeLimits()


# --- YAML ----------------------------------------------------------------------------------------------------------
def read_text(source: str | os.PathLike, limits: RecipeLimits = LIMITS) -> str:
    """The YAML text of ``source``: a path (``os.PathLike``, or a one-line string ending in .yaml/.yml) or text."""
    if isinstance(source, str) and ("\n" in source or not source.endswith((".yaml", ".yml"))):
        if len(source) > limits.max_text_bytes:
            raise RecipeError(
                f"recipe text too large: {len(source)} characters, at most {limits.max_text_bytes}", "<yaml>"
            )
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise RecipeError("a YAML recipe must be a string or a path", "<yaml>", type(source).__name__)
    try:
        path = Path(source)
        if not path.is_file():
            raise RecipeError("recipe file not found", "<file>", shown(str(path)))
        size = path.stat().st_size
        if size > limits.max_text_bytes:
            raise RecipeError(
                f"recipe file too large: {size} bytes, at most {limits.max_text_bytes}", "<file>", shown(str(path))
            )
        with open(path, "rb") as f:
            data = f.read(limits.max_text_bytes + 1)
    except (OSError, ValueError, TypeError) as exc:
        raise RecipeError(f"cannot read recipe file: {exc}", "<file>") from None
    if len(data) > limits.max_text_bytes:  # grew since stat
        raise RecipeError(f"recipe file too large: more than {limits.max_text_bytes} bytes", "<file>")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file is not UTF-8: {exc}", "<file>") from None


def _where(event) -> str:
    mark = getattr(event, "start_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def check_yaml_events(text: str, limits: RecipeLimits = LIMITS) -> None:
    """Stream the parser's events of ``text`` and refuse aliases, anchors and oversized or over-deep input.

    Nothing is composed or constructed here, so memory stays bounded by the text whatever it holds.
    """
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise RecipeError(
                f"YAML aliases (*{event.anchor}) are not allowed in recipes{_where(event)}",
                "<yaml>",
                allowed="repeat the value instead of an anchor and alias",
            )
        if not isinstance(event, yaml.NodeEvent):
            continue
        if event.anchor is not None:
            raise RecipeError(
                f"YAML anchors (&{event.anchor}) are not allowed in recipes{_where(event)}",
                "<yaml>",
                allowed="repeat the value instead of an anchor and alias",
            )
        nodes += 1
        if nodes > limits.max_nodes:
            raise RecipeError(f"recipe too large: more than {limits.max_nodes} values{_where(event)}", "<yaml>")
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > limits.max_string:
            raise RecipeError(
                f"string too long: {len(event.value)} characters, at most {limits.max_string}{_where(event)}", "<yaml>"
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > limits.max_depth:
                raise RecipeError(
                    f"recipe nested too deeply: more than {limits.max_depth} levels{_where(event)}", "<yaml>"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_yaml(text: str, limits: RecipeLimits = LIMITS) -> Any:
    """Parse bounded YAML text to plain data (``check_yaml_events`` first, then the safe loader)."""
    if len(text) > limits.max_text_bytes:
        raise RecipeError(f"recipe text too large: {len(text)} characters, at most {limits.max_text_bytes}", "<yaml>")
    try:
        check_yaml_events(text, limits)
        return yaml.load(text, Loader=_YAML_LOADER)
    except RecipeError:
        raise
    except yaml.YAMLError as exc:
        raise RecipeError(f"invalid YAML: {exc}", "<yaml>") from None
    except Exception as exc:  # PyYAML's constructors fail on some scalars with ValueError, AttributeError, ...
        raise RecipeError(f"invalid YAML value: {type(exc).__name__}: {str(exc)[:300]}", "<yaml>") from None


# --- plain data ----------------------------------------------------------------------------------------------------
class _Walk:
    def __init__(self, limits: RecipeLimits):
        self.limits, self.nodes, self.chars, self.open = limits, 0, 0, set()

    def string(self, value: str, path: str, what: str = "string") -> str:
        if len(value) > self.limits.max_string:
            raise RecipeError(
                f"{what} too long: {len(value)} characters, at most {self.limits.max_string}", path, shown(value)
            )
        self.chars += len(value)
        if self.chars > self.limits.max_total_chars:
            raise RecipeError(f"recipe too large: more than {self.limits.max_total_chars} characters of text", path)
        return str(value)

    def value(self, value: Any, path: str, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise RecipeError(f"recipe too large: more than {self.limits.max_nodes} values", path)
        kind = type(value)
        if (
            kind is dict
            or kind is list
            or kind is tuple
            or (kind not in _SCALARS and isinstance(value, (Mapping, list, tuple)))
        ):
            return self.container(value, path, depth)
        return self.scalar(value, path)

    def scalar(self, value: Any, path: str) -> Any:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):  # numpy scalars
            value = int(value) if isinstance(value, numbers.Integral) else float(value)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if value.bit_length() > self.limits.max_int_bits:
                raise RecipeError(
                    "integer out of range", path, shown(value), f"an integer of at most {self.limits.max_int_bits} bits"
                )
            return int(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise RecipeError("must be a finite number", path, value, "a finite number")
            return float(value)
        if isinstance(value, str):
            return self.string(value, path)
        raise RecipeError(
            f"unsupported value of type {type(value).__name__}",
            path,
            shown(value),
            "null, true/false, numbers, strings, lists and mappings",
        )

    def container(self, value: Mapping | list | tuple, path: str, depth: int) -> dict | list:
        if depth >= self.limits.max_depth:
            raise RecipeError(f"recipe nested too deeply: more than {self.limits.max_depth} levels", path)
        if id(value) in self.open:
            raise RecipeError("recursive structure: a container contains itself", path)
        self.open.add(id(value))
        try:
            if isinstance(value, Mapping):
                return self.mapping(value, path, depth)
            return [self.value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        finally:
            self.open.discard(id(value))

    def mapping(self, value: Mapping, path: str, depth: int) -> dict:
        out = {}
        for key, item in list(value.items()):
            if not isinstance(key, str):
                raise RecipeError("mapping keys must be strings", path, shown(key), "string keys")
            key = self.string(key, path, "key")
            out[key] = self.value(item, f"{path}.{key}" if path else key, depth + 1)
        return out


def plain_data(data: Any, path: str = "", limits: RecipeLimits = LIMITS) -> Any:
    """A plain copy of ``data`` (dicts, lists, bounded scalars) or a ``RecipeError`` at the offending key path."""
    return _Walk(limits).value(data, path, 0)
