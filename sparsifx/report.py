"""Transitional alias of ``sparsifx.reporting`` (where ``report`` and ``Report`` live).

``sparsifx.report`` is the *function* (exported by the package). A submodule of the same name shadows it once
imported, so this alias forwards calls to the function; delete this file when nothing imports
``sparsifx.report`` as a module any more (``sparsifx/cli.py``: ``from .report import report``;
``benchmarks/save_file_fuzz.py``): import from ``sparsifx.reporting`` or use ``sparsifx.report``.
"""
from __future__ import annotations

import sys
import types

from .reporting import *  # noqa: F401,F403
from .reporting import MAC_RULES, LayerReport, Report, _human, report, rule_for  # noqa: F401


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> Report:
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
