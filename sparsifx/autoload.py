"""Import every submodule of a package so that their registry decorators run."""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str, package_path) -> list[str]:
    names = []
    for info in pkgutil.walk_packages(package_path, prefix=f"{package_name}."):
        importlib.import_module(info.name)
        names.append(info.name)
    return names
