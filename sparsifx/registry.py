"""Named registries: the single source of truth for passes, backends, rules and criteria."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import SparsifxError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table. ``register`` works as a decorator or a plain call."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False):
        def add(item: T) -> T:
            if name in self._items and not replace and self._items[name] is not item:
                raise SparsifxError(f"{self.kind} '{name}' is already registered; pass replace=True to override")
            self._items[name] = item
            return item
        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise SparsifxError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self):
        return sorted(self._items.items())


def type_registry_lookup(table: "Registry[T]", obj: object) -> T | None:
    """Find the entry for ``type(obj)`` or its nearest registered base class (keys are qualified type names)."""
    for cls in type(obj).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in table:
            return table.get(key)
    return None


PASSES: Registry[type] = Registry("pass")
ANALYSES: Registry[Callable] = Registry("analysis")
BACKENDS: Registry[object] = Registry("backend")


def register_pass(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: make a ``PassBase`` subclass usable from recipes as ``{pass: name}``."""
    def add(cls: type) -> type:
        cls.name = name
        return PASSES.register(name, cls, replace=replace)
    return add
