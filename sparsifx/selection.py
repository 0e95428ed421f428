"""Which layers a stage touches, and per-layer parameter overrides.

Priority of overrides, lowest to highest: the stage's global parameters < ``by_type`` (module class
name) < ``by_pattern`` (fnmatch on the qualified module name; later patterns win) < ``by_name``
(exact qualified name). ``ignore`` (names or patterns) removes layers entirely; ``types`` lists the
module class names a stage targets (each pass has its own default).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from . import validate
from .errors import RecipeError

SELECTION_KEYS = ("types", "ignore", "by_type", "by_pattern", "by_name")


def _frozen_overrides(key: str, value: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    validate.mapping(key, value)
    out = []
    for target, params in value.items():
        if not isinstance(target, str):
            raise RecipeError("keys must be strings", f"{key}", target, "module type names, patterns or names")
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_types: tuple[str, ...] = ("Conv2d", "Linear")
                  ) -> "LayerSelection":
        return cls(
            types=validate.string_list("types", data["types"]) if "types" in data else (),
            ignore=validate.string_list("ignore", data["ignore"]) if "ignore" in data else (),
            by_type=_frozen_overrides("by_type", data.get("by_type", {})),
            by_pattern=_frozen_overrides("by_pattern", data.get("by_pattern", {})),
            by_name=_frozen_overrides("by_name", data.get("by_name", {})),
            default_types=default_types,
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
        return out

    def with_defaults(self, default_types: tuple[str, ...]) -> "LayerSelection":
        return LayerSelection(self.types, self.ignore, self.by_type, self.by_pattern, self.by_name, default_types)

    def _type_ok(self, module: torch.nn.Module) -> bool:
        wanted = self.types or self.default_types
        return any(c.__name__ in wanted for c in type(module).__mro__)

    def is_ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.ignore)

    def layers(self, root: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
        """Selected (qualified name, module) pairs in ``named_modules`` order."""
        for name, module in root.named_modules():
            if name and self._type_ok(module) and not self.is_ignored(name):
                yield name, module

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


def split_selection(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split stage parameters into (selection keys, the rest)."""
    sel = {k: v for k, v in params.items() if k in SELECTION_KEYS}
    rest = {k: v for k, v in params.items() if k not in SELECTION_KEYS}
    return sel, rest
