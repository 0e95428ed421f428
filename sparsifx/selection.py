"""Which layers a stage touches, and per-layer parameter overrides.

Priority of overrides, lowest to highest: the stage's global parameters < ``by_type`` (module class
name) < ``by_pattern`` (fnmatch on the qualified module name; later patterns win) < ``by_name``
(exact qualified name). ``ignore`` (names or patterns) removes layers entirely; ``types`` lists the
module class names a stage targets (each pass has its own default).

A selection entry that matches nothing is a mistake (a typo in a name, ``ignore: ['*']``), so when a
pass applies the selection to a model (``layers``) it raises ``SelectionError`` naming the key, the entry
and the nearest names that exist, if:

- an ``ignore`` pattern matches no module of the model;
- ``ignore`` removes every layer of the stage's types (the stage would select nothing);
- a ``by_name`` entry is not a selected layer, or a ``by_pattern`` / ``by_type`` entry matches none;
- a ``types`` / ``by_type`` name is no module class of the model nor any ``nn.Module`` class loaded.

A ``types`` list whose classes the model does not contain is not an error (a recipe may serve several
models): the stage selects nothing and a warning is logged. The stage key ``allow_empty: true`` turns
every error above into a logged warning. Type names must be identifiers (checked with the recipe).
"""
from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from . import validate
from .errors import RecipeError

log = logging.getLogger(__name__)

SELECTION_KEYS = ("types", "ignore", "by_type", "by_pattern", "by_name", "allow_empty")


class SelectionError(RecipeError):
    """A selection entry of a stage matches no layer of the model (``path``: ``by_name.fc_2``)."""


def _type_names(key: str, value: Any) -> tuple[str, ...]:
    names = validate.string_list(key, value)
    for i, name in enumerate(names):
        if not name.isidentifier():
            raise RecipeError("not a module class name", f"{key}[{i}]", validate.shown(name),
                              "class names such as Conv2d, Linear")
    return names


def _frozen_overrides(key: str, value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    validate.mapping(key, value)
    out = []
    for target, params in value.items():
        if not isinstance(target, str):
            raise RecipeError("keys must be strings", f"{key}", validate.shown(target),
                              "module type names, patterns or names")
        if key == "by_type" and not target.isidentifier():
            raise RecipeError("not a module class name", f"{key}.{target}", allowed="class names such as Linear")
        validate.mapping(f"{key}.{target}", params)
        out.append((target, tuple(params.items())))
    return tuple(out)


@dataclass(frozen=True)
class LayerSelection:
    types: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    by_type: tuple = ()
    by_pattern: tuple = ()
    by_name: tuple = ()
    default_types: tuple[str, ...] = field(default=("Conv2d", "Linear"), compare=False)
    allow_empty: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_types: tuple[str, ...] = ("Conv2d", "Linear")
                  ) -> "LayerSelection":
        return cls(
            types=_type_names("types", data["types"]) if "types" in data else (),
            ignore=validate.string_list("ignore", data["ignore"]) if "ignore" in data else (),
            by_type=_frozen_overrides("by_type", data.get("by_type", {})),
            by_pattern=_frozen_overrides("by_pattern", data.get("by_pattern", {})),
            by_name=_frozen_overrides("by_name", data.get("by_name", {})),
            default_types=default_types,
            allow_empty=validate.boolean("allow_empty", data["allow_empty"]) if "allow_empty" in data else False,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.types:
            out["types"] = list(self.types)
        if self.ignore:
            out["ignore"] = list(self.ignore)
        for key in ("by_type", "by_pattern", "by_name"):
            if getattr(self, key):
                out[key] = {t: dict(p) for t, p in getattr(self, key)}
        if self.allow_empty:
            out["allow_empty"] = True
        return out

    def with_defaults(self, default_types: tuple[str, ...]) -> "LayerSelection":
        return LayerSelection(self.types, self.ignore, self.by_type, self.by_pattern, self.by_name, default_types,
                              self.allow_empty)

    def _type_ok(self, module: torch.nn.Module) -> bool:
        wanted = self.types or self.default_types
        return any(c.__name__ in wanted for c in type(module).__mro__)

    def is_ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.ignore)

    def layers(self, root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Selected (qualified name, module) pairs in ``named_modules`` order.

        Raises ``SelectionError`` (a warning with ``allow_empty``) when an entry matches nothing (module doc).
        """
        chosen = [(name, module) for name, module in root.named_modules()
                  if name and self._type_ok(module) and not self.is_ignored(name)]
        if self.types or self.ignore or self.by_type or self.by_pattern or self.by_name:
            for problem in _unmatched(self, root, chosen):
                if not self.allow_empty:
                    raise problem
                log.warning("%s (allow_empty: true)", problem)
        return chosen

    def overrides(self, name: str, module: torch.nn.Module) -> dict[str, Any]:
        """Merged parameter overrides for one layer, by the documented priority."""
        merged: dict[str, Any] = {}
        mro_names = [c.__name__ for c in type(module).__mro__]
        for type_name, params in self.by_type:
            if type_name in mro_names:
                merged.update(params)
        for pattern, params in self.by_pattern:
            if fnmatch.fnmatchcase(name, pattern):
                merged.update(params)
        for exact, params in self.by_name:
            if exact == name:
                merged.update(params)
        return merged

    def param(self, name: str, module: torch.nn.Module, key: str, default: Any) -> Any:
        return self.overrides(name, module).get(key, default)

    def sparsity_overrides(self, layers) -> dict[str, float]:
        """``{name: sparsity}`` for the (name, module) ``layers`` that override ``sparsity``, validated."""
        out = {}
        for name, module in layers:
            value = self.param(name, module, "sparsity", None)
            if value is not None:
                out[name] = validate.number(f"{name}.sparsity", value, 0.0, 1.0, hi_open=True)
        return out


def _nearest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=0.5)
    return "nearest: " + ", ".join(close) if close else "no similar name"


def _loaded_module_types() -> set[str]:
    """Names of every ``nn.Module`` subclass imported so far."""
    seen, todo = set(), [torch.nn.Module]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return {cls.__name__ for cls in seen}


def _unmatched(sel: LayerSelection, root: torch.nn.Module, chosen: list) -> list[SelectionError]:
    """One ``SelectionError`` per selection entry that matches nothing in ``root`` (see the module doc)."""
    modules = [(n, m) for n, m in root.named_modules() if n]
    names = [n for n, _ in modules]
    chosen_names = {n for n, _ in chosen}
    model_types = {c.__name__ for _, m in modules for c in type(m).__mro__}
    chosen_types = {c.__name__ for _, m in chosen for c in type(m).__mro__}
    absent = (set(sel.types) | {t for t, _ in sel.by_type}) - model_types
    known = model_types | (_loaded_module_types() if absent else set())
    out = []
    for i, type_name in enumerate(sel.types):
        if type_name not in known:
            out.append(SelectionError("no module class of this name", f"types[{i}]", type_name,
                                      _nearest(type_name, model_types)))
    for i, pattern in enumerate(sel.ignore):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            out.append(SelectionError("matches no module of the model", f"ignore[{i}]", pattern,
                                      _nearest(pattern, names)))
    typed = [n for n, m in modules if sel._type_ok(m)]
    if not chosen and typed:
        out.append(SelectionError(f"removes every layer the stage selects ({len(typed)} of types "
                                  f"{', '.join(sel.types or sel.default_types)})", "ignore", list(sel.ignore)))
    elif not chosen and sel.types and set(sel.types) <= known:
        log.warning("types %s match no module of the model: the stage selects nothing", list(sel.types))
    for name, _ in sel.by_name:
        if name not in chosen_names:
            why = ("names a module the stage does not select (its type is not in types, or it is ignored)"
                   if name in names else "names no layer of the model")
            out.append(SelectionError(why, f"by_name.{name}", allowed=_nearest(name, chosen_names)))
    for pattern, _ in sel.by_pattern:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in chosen_names):
            out.append(SelectionError("matches no selected layer", f"by_pattern.{pattern}",
                                      allowed=_nearest(pattern, chosen_names)))
    for type_name, _ in sel.by_type:
        if type_name not in chosen_types:
            why = "matches no selected layer" if type_name in known else "no module class of this name"
            selected = sorted({type(m).__name__ for _, m in chosen})
            out.append(SelectionError(why, f"by_type.{type_name}",
                                      allowed="types of the selected layers: " + (", ".join(selected) or "none")))
    return out


def split_selection(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split stage parameters into (selection keys, the rest)."""
    sel = {k: v for k, v in params.items() if k in SELECTION_KEYS}
    rest = {k: v for k, v in params.items() if k not in SELECTION_KEYS}
    return sel, rest
