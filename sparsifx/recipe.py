"""Recipes as data: a frozen list of stages, each naming a registered pass and its parameters.

A recipe is ``{name?: str, description?: str, stages: [{pass: <name>, <params>...}, ...]}``. Layer
selection keys (``types``, ``ignore``, ``by_type``, ``by_pattern``, ``by_name``; see
``sparsifx.selection``) are accepted by passes whose constructor takes ``selection``. Every error
is a ``RecipeError`` whose path points at the offending key, e.g. ``stages[1].sparsity``.

Recipes are untrusted input: YAML and dicts are bounded in size and depth, YAML anchors/aliases are
refused, and values must be plain data before any stage is built (``sparsifx.recipe_input``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from .errors import RecipeError
from .recipe_input import load_yaml, plain_data, read_text
from .registry import PASSES
from .selection import LayerSelection, split_selection
from .validate import shown

TOP_LEVEL_KEYS = ("name", "description", "stages")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return ("__list__",) + tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value[:1] == ("__list__",):
        return [_thaw(v) for v in value[1:]]
    if isinstance(value, tuple) and all(isinstance(i, tuple) and len(i) == 2 for i in value):
        return {k: _thaw(v) for k, v in value}
    return value


@dataclass(frozen=True)
class Stage:
    """One pass application: registered pass name plus its (frozen) parameters."""

    pass_name: str
    frozen_params: tuple = ()

    @property
    def params(self) -> dict[str, Any]:
        return _thaw(self.frozen_params) if self.frozen_params else {}

    @classmethod
    def from_dict(cls, data: Any) -> "Stage":
        data = plain_data(data)
        if not isinstance(data, Mapping):
            raise RecipeError("a stage must be a mapping with a 'pass' key", "", shown(data), "{pass: <name>, ...}")
        if "pass" not in data:
            raise RecipeError("missing 'pass' key", "pass", allowed=", ".join(PASSES.names()))
        name = data["pass"]
        if not isinstance(name, str) or name not in PASSES:
            raise RecipeError("unknown pass", "pass", shown(name), ", ".join(PASSES.names()))
        stage = cls(name, _freeze({k: v for k, v in data.items() if k != "pass"}))
        stage.build()  # validate now, before any model is touched
        return stage

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, **copy.deepcopy(self.params)}

    def build(self):
        """Instantiate the pass; bad parameters raise ``RecipeError`` with a relative path."""
        cls = PASSES.get(self.pass_name)
        sel_params, params = split_selection(self.params)
        if "selection" in params:
            raise RecipeError(
                "give the selection keys directly in the stage",
                "selection",
                allowed="types, ignore, by_type, by_pattern, by_name, allow_empty",
            )
        if sel_params:
            if "selection" not in _init_params(cls):
                key = next(iter(sel_params))
                raise RecipeError(f"pass '{self.pass_name}' takes no layer selection", key)
            selection = LayerSelection.from_dict(sel_params)
            _check_overrides(cls, params, selection)
            params = {**params, "selection": selection}
        return cls.from_params(params)


def _init_params(cls) -> list[str]:
    import inspect

    return list(inspect.signature(cls.__init__).parameters)[1:]


def _check_overrides(cls, params: dict[str, Any], selection: LayerSelection) -> None:
    allowed = tuple(getattr(cls, "layer_params", ()))
    for key in ("by_type", "by_pattern", "by_name"):
        for target, overrides in getattr(selection, key):
            for pkey, pvalue in overrides:
                path = f"{key}.{target}.{pkey}"
                if pkey not in allowed:
                    raise RecipeError(
                        f"parameter cannot be set per layer for pass '{cls.name}'",
                        path,
                        allowed=", ".join(allowed) or "none",
                    )
                try:
                    cls.from_params({**params, pkey: pvalue})
                except RecipeError as exc:
                    raise RecipeError(exc.reason, path, exc.value, exc.allowed) from None


@dataclass(frozen=True)
class Recipe:
    """A frozen, validated list of stages."""

    stages: tuple[Stage, ...]
    name: str = ""
    description: str = ""

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """From plain data; bounded (size, depth, no cycles) and type-checked before any stage is built."""
        data = plain_data(data)
        if not isinstance(data, Mapping):
            raise RecipeError("a recipe must be a mapping", "", shown(data), "{name?, description?, stages: [...]}")
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise RecipeError("unknown top-level key", key, allowed=", ".join(TOP_LEVEL_KEYS))
        for key in ("name", "description"):
            if key in data and not isinstance(data[key], str):
                raise RecipeError("must be a string", key, shown(data[key]))
        if "stages" not in data:
            raise RecipeError("missing key", "stages", allowed="a list of {pass: <name>, ...}")
        stages = data["stages"]
        if not isinstance(stages, list) or not stages:
            raise RecipeError("must be a non-empty list", "stages", shown(stages), "a list of {pass: <name>, ...}")
        built = []
        for i, stage in enumerate(stages):
            try:
                built.append(Stage.from_dict(stage))
            except RecipeError as exc:
                raise exc.at(f"stages[{i}]") from None
        return cls(tuple(built), data.get("name", ""), data.get("description", ""))

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> "Recipe":
        """From a YAML file path or a YAML string (at most 1 MiB; no anchors or aliases)."""
        return cls.from_dict(load_yaml(read_text(source)))

    @classmethod
    def load(cls, recipe: "Recipe | Mapping | str | os.PathLike") -> "Recipe":
        """Accept a Recipe, a dict, a YAML path or a YAML string."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Mapping):
            return cls.from_dict(recipe)
        if isinstance(recipe, (str, os.PathLike)):
            return cls.from_yaml(recipe)
        raise RecipeError("a recipe must be a Recipe, a dict, a YAML string or a path", "", type(recipe).__name__)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        out["stages"] = [s.to_dict() for s in self.stages]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def build_passes(self) -> list:
        return [stage.build() for stage in self.stages]
