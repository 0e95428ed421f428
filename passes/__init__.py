"""Built-in analyses and transform passes (installed as ``sparsifx.passes``).

``register_builtins()`` is the one entry point that registers the built-in passes: it imports every module
below this package, so a new pass only needs its file and its ``@register_pass`` decorator.
``sparsifx.registry.PASSES`` calls it the first time the pass table is looked up or listed; ``import sparsifx``
imports no pass module.
"""

from __future__ import annotations

from sparsifx.autoload import import_submodules

LOADED: list[str] | None = None


def register_builtins() -> list[str]:
    """Import (and thereby register) every built-in pass and analysis; returns the module names. Idempotent."""
    global LOADED
    if LOADED is None:
        LOADED = import_submodules(__name__, __path__)
    return LOADED
