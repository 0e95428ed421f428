"""Named registries: the single source of truth for passes, analyses, backends, rules and criteria.

Entries for a type are keyed by the type's qualified name (``type_key``: ``"torch.nn.modules.conv.Conv2d"``);
``register``, ``get`` and ``in`` also take the type itself. ``type_registry_lookup`` is the one lookup along a
class's MRO (nearest registered base class wins).

The built-in passes register themselves through one entry point, ``sparsifx.passes.register_builtins()``, which
``PASSES`` calls the first time it is looked up, listed or added to: ``import sparsifx`` imports no pass module.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import SparsifxError

T = TypeVar("T")


def type_key(cls: type) -> str:
    """The registry key of a type: its qualified name ``module.QualName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _key(name: object) -> object:
    return type_key(name) if isinstance(name, type) else name


class Registry(Generic[T]):
    """A name -> object table. ``register`` works as a decorator or a plain call."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | type, obj: T | None = None, *, replace: bool = False):
        name = _key(name)

        def add(item: T) -> T:
            if name in self._items and not replace and self._items[name] is not item:
                raise SparsifxError(f"{self.kind} '{name}' is already registered; pass replace=True to override")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str | type) -> T:
        try:
            return self._items[_key(name)]
        except KeyError:
            raise SparsifxError(f"unknown {self.kind} '{_key(name)}'; registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return _key(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self):
        return sorted(self._items.items())


def type_registry_lookup(table: "Registry[T]", obj: object, *, prefix: str = "", suffix: str = "") -> T | None:
    """The entry for ``obj``'s type (``obj`` itself when it is a type) or its nearest registered base class.

    Keys are ``prefix + type_key(cls) + suffix`` (a registry that holds other kinds of keys as well namespaces
    its type keys, e.g. ``"module:"``; ``suffix`` selects an entry per type, e.g. ``".weight"``)."""
    for cls in (obj if isinstance(obj, type) else type(obj)).__mro__:
        key = f"{prefix}{type_key(cls)}{suffix}"
        if key in table:
            return table.get(key)
    return None


class _PassRegistry(Registry[type]):
    """``PASSES``: loads the built-in passes (``sparsifx.passes.register_builtins``) on first use."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self._builtins = "pending"  # "pending" -> "loading" -> "loaded"
        self._overridden: set[str] = set()  # built-in names a user replaced before the built-ins loaded

    def _load_builtins(self) -> None:
        if self._builtins != "pending":
            return
        self._builtins = "loading"
        try:
            importlib.import_module("sparsifx.passes").register_builtins()
        except BaseException:
            self._builtins = "pending"
            raise
        self._builtins = "loaded"

    def register(self, name, obj=None, *, replace=False):
        if self._builtins == "loading" and name in self._overridden:
            return obj if obj is not None else (lambda item: item)  # the user's replacement stays
        if replace and self._builtins != "loaded":
            self._overridden.add(name)
        return super().register(name, obj, replace=replace)

    def get(self, name):
        self._load_builtins()
        return super().get(name)

    def names(self) -> list[str]:
        self._load_builtins()
        return super().names()

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return super().__contains__(name)


PASSES: Registry[type] = _PassRegistry("pass")
ANALYSES: Registry[Callable] = Registry("analysis")


def register_pass(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: make a ``PassBase`` subclass usable from recipes as ``{pass: name}``.

    The class must state ``in_place`` (``PassDefinitionError`` otherwise)."""

    def add(cls: type) -> type:
        from .pass_base import check_pass_class

        check_pass_class(cls)
        cls.name = name
        return PASSES.register(name, cls, replace=replace)

    return add
