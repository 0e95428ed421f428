"""Backends that lower GraphModules to artefacts (installed as ``sparsifx.backends``).

Every module below this package is imported on first use of the package, so a new backend only
needs its file and its registry decorator.
"""

from sparsifx.autoload import import_submodules

LOADED = import_submodules(__name__, __path__)

from .onnx_import import load_onnx as load_onnx  # noqa: E402  (public: an ONNX file into the sparse runtime)
