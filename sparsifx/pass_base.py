"""The pass contract: ``call(gm) -> PassResult``, wrapped by ``requires`` / ``ensures`` checks."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch.fx as fx

from . import validate
from .errors import PassError, PostconditionError, PreconditionError, RecipeError, SparsifxError

ALL_ANALYSES = "*"


@dataclass
class PassResult:
    """What a pass returns: the module and whether anything changed (exactly)."""
    gm: fx.GraphModule
    modified: bool


class PassBase:
    """Base of every graph pass.

    Subclasses implement ``call``. Class attributes declare the contract:
    ``in_place`` (the result is the input object) or functional (a new object when modified);
    ``preserves_semantics`` (the manager verifies outputs with ``verify=True``);
    ``requires_analyses`` / ``invalidates_analyses`` (``node.meta`` keys, ``"*"`` for all).
    """

    name: ClassVar[str] = ""
    in_place: ClassVar[bool] = True
    preserves_semantics: ClassVar[bool] = False
    requires_analyses: ClassVar[tuple[str, ...]] = ()
    invalidates_analyses: ClassVar[tuple[str, ...]] = (ALL_ANALYSES,)

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def exactness_waived(self, gm: fx.GraphModule) -> str | None:
        """Why this ``preserves_semantics`` pass will not preserve ``gm``'s outputs this time (the manager then
        skips its verification, logs and records the reason), or ``None``: they are verified as usual."""
        return None

    def requires(self, gm: fx.GraphModule) -> None:
        """Raise ``PreconditionError`` if ``gm`` is not a valid input."""
        if not isinstance(gm, fx.GraphModule):
            raise PreconditionError(f"pass '{self.label}' needs a torch.fx.GraphModule, got {type(gm).__name__}")

    def ensures(self, gm: fx.GraphModule) -> None:
        """Raise ``PostconditionError`` if the output is malformed (by default: graph lint)."""
        try:
            gm.graph.lint()
        except Exception as exc:  # fx raises RuntimeError on a malformed graph
            raise PostconditionError(f"pass '{self.label}' produced a malformed graph: {exc}") from exc

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        try:
            result = self.call(gm)
        except SparsifxError:
            raise
        except Exception as exc:
            raise PassError(f"pass '{self.label}' failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass '{self.label}' returned {type(result).__name__}, not PassResult")
        if self.in_place and result.gm is not gm:
            raise PostconditionError(f"pass '{self.label}' declares in_place but returned a new module")
        if not self.in_place and result.modified and result.gm is gm:
            raise PostconditionError(f"pass '{self.label}' declares functional but modified its input in place")
        self.ensures(result.gm)
        return result

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PassBase":
        """Build from recipe parameters; unknown or missing keys and bad values raise ``RecipeError``.

        The constructor validates its parameters; values it lets through are also checked against the simple
        annotations of its signature (``int``, ``float | None``, ``str``, ``bool``, ``Callable``), and any other
        exception it raises becomes a ``RecipeError`` at the parameter that causes it.
        """
        if not isinstance(params, Mapping):
            raise RecipeError(f"parameters of pass '{cls.name}' must be a mapping", "", validate.shown(params))
        sig = inspect.signature(cls.__init__)
        accepted = {n: p for n, p in list(sig.parameters.items())[1:]
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        for key in params:
            if not isinstance(key, str):
                raise RecipeError(f"parameter names of pass '{cls.name}' must be strings", "", validate.shown(key))
            if key not in accepted:
                raise RecipeError(f"unknown parameter for pass '{cls.name}'", key,
                                  allowed=", ".join(accepted) or "no parameters")
        for key, p in accepted.items():
            if p.default is inspect.Parameter.empty and key not in params:
                raise RecipeError(f"missing required parameter of pass '{cls.name}'", key)
        try:
            built = cls(**params)
        except SparsifxError:
            raise
        except Exception as exc:  # the constructor let a bad value through to code that fails on it
            for key, value in params.items():
                validate.annotated(key, value, accepted[key].annotation)
            raise RecipeError(f"invalid parameters for pass '{cls.name}': {type(exc).__name__}: {str(exc)[:300]}",
                              _blame(cls, accepted, params)) from exc
        for key, value in params.items():
            validate.annotated(key, value, accepted[key].annotation)
        return built


def _blame(cls, accepted: dict[str, inspect.Parameter], params: Mapping[str, Any]) -> str:
    """The parameter whose value alone (with the required ones) makes the constructor fail, or ``""``."""
    required = {k: v for k, v in params.items() if accepted[k].default is inspect.Parameter.empty}
    for key, value in params.items():
        try:
            cls(**{**required, key: value})
        except Exception:
            return key
    return ""
