"""Built-in analyses and transform passes (installed as ``sparsifx.passes``).

Every module below this package is imported here, so a new pass only needs its file and its
``@register_pass`` decorator.
"""
from sparsifx.autoload import import_submodules

LOADED = import_submodules(__name__, __path__)
