"""The pass contract: ``call(gm) -> PassResult``, wrapped by ``requires`` / ``ensures`` checks.

Every pass states ``in_place`` (``True``: the result is the input object; ``False``: functional, a new object
when modified): there is no default, and a pass class without it raises ``PassDefinitionError`` when it is
created (or registered). Exceptions other than ``SparsifxError`` raised inside ``requires`` / ``ensures``
become ``PreconditionError`` / ``PostconditionError``; inside ``call`` they become ``PassError`` (the pass
manager adds the passes that ran before it).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch.fx as fx

from . import validate
from .errors import PassError, PostconditionError, PreconditionError, RecipeError, SparsifxError

ALL_ANALYSES = "*"

# True while the pass manager runs a pass: it has provided the declared analyses itself
_MANAGED: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsifx_managed_pass", default=False)


class PassDefinitionError(SparsifxError, TypeError):
    """A pass class breaks the contract's declarations (e.g. it does not state ``in_place``)."""


class PassCrash(PassError):
    """A pass raised something other than a ``SparsifxError`` inside ``call``. ``pass_name`` names it;
    ``passes_before`` lists the passes the manager ran before it (empty when it was called directly)."""

    def __init__(self, pass_name: str, detail: str, passes_before: list[str] | None = None):
        self.pass_name, self.detail, self.passes_before = pass_name, detail, list(passes_before or [])
        prior = (
            f" (passes run before it: {', '.join(self.passes_before) or 'none'})" if passes_before is not None else ""
        )
        super().__init__(f"pass '{pass_name}' failed{prior}: {detail}")


def check_pass_class(cls: type) -> None:
    """Raise ``PassDefinitionError`` unless ``cls`` states ``in_place`` as a bool (itself or a base pass)."""
    value = getattr(cls, "in_place", None)
    if not isinstance(value, bool):
        raise PassDefinitionError(
            f"pass class {cls.__module__}.{cls.__qualname__} must state in_place = True (it returns its input "
            "module, modified in place) or in_place = False (functional: a new module when modified)"
            + (f"; got {value!r}" if value is not None else "")
        )


@contextlib.contextmanager
def managed_call():
    """Within: passes leave providing their analyses to the caller (the pass manager)."""
    token = _MANAGED.set(True)
    try:
        yield
    finally:
        _MANAGED.reset(token)


@dataclass
class PassResult:
    """What a pass returns: the module and whether anything changed (exactly)."""

    gm: fx.GraphModule
    modified: bool


class PassBase:
    """Base of every graph pass.

    Subclasses implement ``call``. Class attributes declare the contract:
    ``in_place`` (required: the result is the input object, or functional: a new object when modified);
    ``preserves_semantics`` (the manager verifies outputs with ``verify=True``);
    ``requires_analyses`` (names in ``sparsifx.registry.ANALYSES``: the manager runs each before the pass
    unless still valid, and raises ``PreconditionError`` for one it cannot provide), ``uses_analyses``
    (provided when possible; the pass checks what it reads) and ``invalidates_analyses`` (``"*"`` for all).
    A pass called directly runs its declared analyses whose results are missing from
    ``gm.meta["example_inputs"]`` when those are there (``sparsifx.analysis.provide``).
    """

    name: ClassVar[str] = ""
    in_place: ClassVar[bool]  # no default: every pass states it
    preserves_semantics: ClassVar[bool] = False
    requires_analyses: ClassVar[tuple[str, ...]] = ()
    uses_analyses: ClassVar[tuple[str, ...]] = ()
    invalidates_analyses: ClassVar[tuple[str, ...]] = (ALL_ANALYSES,)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.call is not PassBase.call:  # a concrete pass (an abstract base may leave it to its subclasses)
            check_pass_class(cls)

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

    def _checked(self, check: Callable[[fx.GraphModule], None], gm: fx.GraphModule, error: type, what: str) -> None:
        try:
            check(gm)
        except SparsifxError:
            raise
        except Exception as exc:
            raise error(f"pass '{self.label}': its {what} check raised {type(exc).__name__}: {exc}") from exc

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if isinstance(gm, fx.GraphModule) and not _MANAGED.get():
            from .analysis import provide

            provide(gm, (*self.requires_analyses, *self.uses_analyses))
        self._checked(self.requires, gm, PreconditionError, "precondition")
        try:
            result = self.call(gm)
        except SparsifxError:
            raise
        except Exception as exc:
            raise PassCrash(self.label, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass '{self.label}' returned {type(result).__name__}, not PassResult")
        if self.in_place and result.gm is not gm:
            raise PostconditionError(f"pass '{self.label}' declares in_place but returned a new module")
        if not self.in_place and result.modified and result.gm is gm:
            raise PostconditionError(f"pass '{self.label}' declares functional but modified its input in place")
        self._checked(self.ensures, result.gm, PostconditionError, "postcondition")
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
        accepted = {
            n: p for n, p in list(sig.parameters.items())[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        for key in params:
            if not isinstance(key, str):
                raise RecipeError(f"parameter names of pass '{cls.name}' must be strings", "", validate.shown(key))
            if key not in accepted:
                raise RecipeError(
                    f"unknown parameter for pass '{cls.name}'", key, allowed=", ".join(accepted) or "no parameters"
                )
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
            raise RecipeError(
                f"invalid parameters for pass '{cls.name}': {type(exc).__name__}: {str(exc)[:300]}",
                _blame(cls, accepted, params),
            ) from exc
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
