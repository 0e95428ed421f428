"""sparsifx: graph transformations that make sparse neural networks real.

Public names are loaded lazily so that ``import sparsifx`` stays light (ONNX and the backends are
imported on first use). The core imports no pass module: the built-in passes register through
``sparsifx.passes.register_builtins()``, which the pass registry calls on first use.
"""

from __future__ import annotations

import importlib

from .api import sparsify
from .errors import (
    BackendError,
    PassError,
    PostconditionError,
    PreconditionError,
    RecipeError,
    SparsifxError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from .pass_base import PassBase, PassCrash, PassDefinitionError, PassResult
from .pass_manager import PassManager
from .recipe import Recipe
from .registry import register_pass
from .tracing import trace

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "report": "sparsifx.reporting",
    "export_onnx": "sparsifx.backends.onnx_export",
    "save": "sparsifx.serialization",
    "load": "sparsifx.serialization",
    "attach": "sparsifx.passes.training.dst_controller",
}


def __getattr__(name: str):
    if name == "passes":  # the built-in passes, loaded on first use (the pass registry's entry point)
        from .registry import PASSES

        PASSES.names()
        return importlib.import_module("sparsifx.passes")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsifx' has no attribute '{name}'")


__all__ = [
    "sparsify",
    "trace",
    "Recipe",
    "PassBase",
    "PassResult",
    "PassManager",
    "register_pass",
    "report",
    "export_onnx",
    "save",
    "load",
    "attach",
    "SparsifxError",
    "TraceError",
    "RecipeError",
    "PassError",
    "BackendError",
    "PreconditionError",
    "PostconditionError",
    "UnsupportedOpError",
    "VerificationError",
    "PassCrash",
    "PassDefinitionError",
]
