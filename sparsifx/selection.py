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

Type matching is by class name along the MRO, as ``isinstance`` would (``Conv2d`` matches timm's
``StdConv2d``). A module fx traced into survives in the GraphModule only as a bare ``nn.Module`` container
of its tensors; a selection made ``with_traced_into()`` (channel pruning, whose functional-layer rules
prune such containers) types it by the class ``gm.meta["module_classes"]`` recorded at trace time
(``sparsifx.module_classes``). Passes that need the real layer class (``magnitude`` swaps layers for
``Masked*`` ones) leave that off, so they never select a container.

First/last-layer exclusion: every pass that can keep the first or last selected layer dense spells it
``dense_first_layer`` / ``dense_last_layer`` (booleans; "first"/"last" in the pass's layer order). The older
spellings ``dense_first`` / ``dense_last`` (the dynamic sparse training passes) and ``sparsify_first_layer`` /
``sparsify_last_layer`` (``swat``, the negation) are still accepted and raise a ``DeprecationWarning`` naming the
new key (:func:`renamed_exclusion_keys`).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from . import validate
from .errors import RecipeError
from .module_classes import type_names

log = logging.getLogger(__name__)

SELECTION_KEYS = ("types", "ignore", "by_type", "by_pattern", "by_name", "allow_empty")

DENSE_FIRST, DENSE_LAST = "dense_first_layer", "dense_last_layer"
# deprecated spelling -> (the key that replaces it, whether its value is negated)
DEPRECATED_EXCLUSION_KEYS = {
    "dense_first": (DENSE_FIRST, False),
    "dense_last": (DENSE_LAST, False),
    "sparsify_first_layer": (DENSE_FIRST, True),
    "sparsify_last_layer": (DENSE_LAST, True),
}


class SelectionError(RecipeError):
    """A selection entry of a stage matches no layer of the model (``path``: ``by_name.fc_2``)."""


def _type_names(key: str, value: Any) -> tuple[str, ...]:
    names = validate.string_list(key, value)
    for i, name in enumerate(names):
        if not name.isidentifier():
            raise RecipeError(
                "not a module class name", f"{key}[{i}]", validate.shown(name), "class names such as Conv2d, Linear"
            )
    return names


def _frozen_overrides(key: str, value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    validate.mapping(key, value)
    out = []
    for target, params in value.items():
        if not isinstance(target, str):
            raise RecipeError(
                "keys must be strings", f"{key}", validate.shown(target), "module type names, patterns or names"
            )
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
    traced_into: bool = field(default=False, compare=False)  # type bare containers by their recorded class

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], default_types: tuple[str, ...] = ("Conv2d", "Linear")
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
        return dataclasses.replace(self, default_types=default_types)

    def with_traced_into(self) -> "LayerSelection":
        """This selection, typing bare containers of traced-into modules by their recorded class."""
        return dataclasses.replace(self, traced_into=True)

    def type_names(self, root: torch.nn.Module | None, name: str, module: torch.nn.Module) -> tuple[str, ...]:
        """The class names ``module`` matches (its MRO's; a container's recorded ones with ``traced_into``)."""
        return (
            type_names(root, name, module, self.traced_into)
            if root is not None
            else tuple(c.__name__ for c in type(module).__mro__)
        )

    def _type_ok(self, root: torch.nn.Module, name: str, module: torch.nn.Module) -> bool:
        wanted = self.types or self.default_types
        return any(c in wanted for c in self.type_names(root, name, module))

    def is_ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.ignore)

    def layers(self, root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Selected (qualified name, module) pairs in ``named_modules`` order.

        Raises ``SelectionError`` (a warning with ``allow_empty``) when an entry matches nothing (module doc).
        """
        chosen = [
            (name, module)
            for name, module in root.named_modules()
            if name and self._type_ok(root, name, module) and not self.is_ignored(name)
        ]
        if self.types or self.ignore or self.by_type or self.by_pattern or self.by_name:
            for problem in _unmatched(self, root, chosen):
                if not self.allow_empty:
                    raise problem
                log.warning("%s (allow_empty: true)", problem)
        return chosen

    def overrides(self, name: str, module: torch.nn.Module, root: torch.nn.Module | None = None) -> dict[str, Any]:
        """Merged parameter overrides for one layer, by the documented priority (``root``: the model, so
        that ``by_type`` sees a container's recorded class)."""
        merged: dict[str, Any] = {}
        mro_names = self.type_names(root, name, module)
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

    def param(
        self, name: str, module: torch.nn.Module, key: str, default: Any, root: torch.nn.Module | None = None
    ) -> Any:
        return self.overrides(name, module, root).get(key, default)

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
    model_types = {c for n, m in modules for c in sel.type_names(root, n, m)}
    chosen_types = {c for n, m in chosen for c in sel.type_names(root, n, m)}
    absent = (set(sel.types) | {t for t, _ in sel.by_type}) - model_types
    known = model_types | (_loaded_module_types() if absent else set())
    out = []
    for i, type_name in enumerate(sel.types):
        if type_name not in known:
            out.append(
                SelectionError(
                    "no module class of this name", f"types[{i}]", type_name, _nearest(type_name, model_types)
                )
            )
    for i, pattern in enumerate(sel.ignore):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            out.append(
                SelectionError("matches no module of the model", f"ignore[{i}]", pattern, _nearest(pattern, names))
            )
    typed = [n for n, m in modules if sel._type_ok(root, n, m)]
    if not chosen and typed:
        out.append(
            SelectionError(
                f"removes every layer the stage selects ({len(typed)} of types "
                f"{', '.join(sel.types or sel.default_types)})",
                "ignore",
                list(sel.ignore),
            )
        )
    elif not chosen and sel.types and set(sel.types) <= known:
        log.warning("types %s match no module of the model: the stage selects nothing", list(sel.types))
    for name, _ in sel.by_name:
        if name not in chosen_names:
            why = (
                "names a module the stage does not select (its type is not in types, or it is ignored)"
                if name in names
                else "names no layer of the model"
            )
            out.append(SelectionError(why, f"by_name.{name}", allowed=_nearest(name, chosen_names)))
    for pattern, _ in sel.by_pattern:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in chosen_names):
            out.append(
                SelectionError(
                    "matches no selected layer", f"by_pattern.{pattern}", allowed=_nearest(pattern, chosen_names)
                )
            )
    for type_name, _ in sel.by_type:
        if type_name not in chosen_types:
            why = "matches no selected layer" if type_name in known else "no module class of this name"
            selected = sorted({sel.type_names(root, n, m)[0] for n, m in chosen})
            out.append(
                SelectionError(
                    why,
                    f"by_type.{type_name}",
                    allowed="types of the selected layers: " + (", ".join(selected) or "none"),
                )
            )
    return out


def renamed_exclusion_keys(pass_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the deprecated first/last-layer exclusion keys replaced by ``dense_first_layer`` /
    ``dense_last_layer`` (a ``sparsify_*`` value is negated; ``None`` stays ``None``). Each old key raises a
    ``DeprecationWarning`` naming its replacement; an old key given together with its new one is a
    ``RecipeError``."""
    import warnings

    out = dict(params)
    for old, (new, negate) in DEPRECATED_EXCLUSION_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in params:
            raise RecipeError(f"give only {new} (the deprecated {old} is given too) to pass '{pass_name}'", old)
        warnings.warn(
            f"pass '{pass_name}': '{old}' is deprecated; use '{new}'"
            + (f" (the negation: {new} = not {old})" if negate else ""),
            DeprecationWarning,
            stacklevel=3,
        )
        if negate and value is not None:
            value = not validate.boolean(old, value)
        out[new] = value
    return out


def split_selection(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split stage parameters into (selection keys, the rest)."""
    sel = {k: v for k, v in params.items() if k in SELECTION_KEYS}
    rest = {k: v for k, v in params.items() if k not in SELECTION_KEYS}
    return sel, rest
