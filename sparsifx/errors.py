"""Typed errors: every failure sparsifx reports to a user is a ``SparsifxError``."""

from __future__ import annotations

import copy
from typing import Any, Sequence


class SparsifxError(Exception):
    """Root of all sparsifx errors."""


class TraceError(SparsifxError):
    """A model (or submodule) could not be traced; names the module, node and a remedy."""


class ExampleInputError(TraceError):
    """The model rejects its example inputs (raised before any pass runs). ``inputs`` describes their shapes and
    dtypes, ``node`` and ``module`` name where the forward failed (``None`` when unknown)."""

    def __init__(self, message: str, inputs: str, node: str | None = None, module: str | None = None):
        self.inputs, self.node, self.module = inputs, node, module
        super().__init__(message)


class RecipeError(SparsifxError):
    """A malformed recipe. ``path`` is the key path (``stages[1].sparsity``)."""

    _MISSING = object()

    def __init__(self, reason: str, path: str = "", value: Any = _MISSING, allowed: str | None = None):
        self.reason, self.path, self.value, self.allowed = reason, path, value, allowed
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = f"{self.path}: " if self.path else ""
        got = "" if self.value is RecipeError._MISSING else f" (got {self.value!r})"
        allowed = f"; allowed: {self.allowed}" if self.allowed else ""
        return f"{where}{self.reason}{got}{allowed}"

    def at(self, prefix: str) -> "RecipeError":
        """The same error with ``prefix`` prepended to its key path."""
        path = (
            prefix
            if not self.path
            else (f"{prefix}{self.path}" if self.path.startswith("[") else f"{prefix}.{self.path}")
        )
        err = copy.copy(self)  # keeps the subclass (e.g. SelectionError)
        err.path = path
        err.args = (err._compose(),)
        return err


class PassError(SparsifxError):
    """A pass failed, or its output broke the model's semantics."""


class PreconditionError(PassError):
    """A pass's ``requires`` check failed on its input module."""


class PostconditionError(PassError):
    """A pass broke its contract (result type, in-place promise, ``ensures``)."""


class VerificationError(PassError):
    """Outputs changed across a pass that claims to preserve semantics."""

    def __init__(self, pass_name: str, before: Sequence[str], detail: str):
        self.pass_name, self.passes_before = pass_name, list(before)
        prior = ", ".join(before) if before else "none"
        super().__init__(f"pass '{pass_name}' changed the model's outputs (passes before it: {prior}): {detail}")


class UnsupportedOpError(PassError):
    """An op a pass has no rule for, where the pass cannot treat it as a barrier."""

    def __init__(self, reason: str, module: str | None = None, node: str | None = None):
        self.module, self.node = module, node
        parts = [p for p in (f"module '{module}'" if module else "", f"node '{node}'" if node else "") if p]
        super().__init__(f"{' / '.join(parts)}: {reason}" if parts else reason)


class SerializationError(SparsifxError):
    """A module cannot be saved as plain data, or a file is malformed or names something outside the allow-lists."""


class CliError(SparsifxError):
    """A bad command-line argument or input file (``sparsifx`` command line; re-exported by ``sparsifx.cli``)."""


class BackendError(SparsifxError):
    """Lowering or export failed, or the artefact does not match torch."""


class ArtefactError(SparsifxError):
    """A file sparsifx writes (an export, a cache) cannot be written where it was asked to go."""
