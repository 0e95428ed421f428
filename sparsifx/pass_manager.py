"""Runs passes in order, keeps analyses fresh, and verifies semantics-preserving passes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from .analysis import Analysis, example_inputs_of, missing
from .errors import PassError, RecipeError, VerificationError
from .module_utils import eval_mode
from .pass_base import ALL_ANALYSES, PassBase, PassCrash, PassResult, managed_call
from .registry import ANALYSES

log = logging.getLogger(__name__)

MAX_FIXED_POINT_ITERATIONS = 100


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-4


@dataclass
class PassRecord:
    name: str
    modified: bool
    verified: bool
    waived: str | None = None  # why verification was skipped for a semantics-preserving pass


@dataclass
class ManagerResult(PassResult):
    history: list[PassRecord] = field(default_factory=list)


def run_model(gm: torch.nn.Module, inputs: Sequence[Any]) -> Any:
    """Forward in eval mode without grad, restoring every submodule's own training flag."""
    with eval_mode(gm), torch.no_grad():
        return gm(*inputs)


class PassManager:
    """Run ``passes`` over a GraphModule.

    ``example_inputs`` (default: ``gm.meta["example_inputs"]``) feed the analyses and verification. Before each
    pass the manager runs the analyses it declares (``requires_analyses``, ``uses_analyses``) unless their results
    are still valid; a required one it cannot run (no example inputs, no result on the module) raises
    ``PreconditionError`` naming the pass and the analysis. A pass that crashes raises ``PassError`` naming it
    and the passes run before it. With ``verify=True`` every pass whose class
    sets ``preserves_semantics`` is checked with ``torch.testing.assert_close``; a mismatch raises
    ``VerificationError`` naming it and the passes before it. A pass that waives it for this module
    (``PassBase.exactness_waived``) is not checked: the reason is logged and kept in its ``PassRecord``.
    ``fixed_point`` repeats the whole list until no pass modifies the module.
    """

    def __init__(
        self,
        passes: Iterable[PassBase],
        example_inputs: Sequence[Any] | None = None,
        verify: bool = False,
        tolerance: Tolerance = Tolerance(),
        fixed_point: bool = False,
        progress: bool = False,
    ):
        self.passes = list(passes)
        self.example_inputs = tuple(example_inputs) if example_inputs is not None else None
        self.verify, self.tolerance, self.fixed_point, self.progress = verify, tolerance, fixed_point, progress
        self._valid: set[str] = set()

    @classmethod
    def from_recipe(cls, recipe, **kwargs) -> "PassManager":
        return cls(recipe.build_passes(), **kwargs)

    def __call__(self, gm: fx.GraphModule) -> ManagerResult:
        return self.run(gm)

    def run(self, gm: fx.GraphModule) -> ManagerResult:
        history: list[PassRecord] = []
        any_modified = False
        for _ in range(MAX_FIXED_POINT_ITERATIONS if self.fixed_point else 1):
            round_modified = False
            for i, p in enumerate(self._iterate()):
                try:
                    gm, modified = self._run_one(p, gm, history)
                except RecipeError as exc:  # a stage's parameters met the model (e.g. a selection matching nothing)
                    raise exc.at(f"stages[{i}]") from exc
                round_modified |= modified
            any_modified |= round_modified
            if not round_modified or not self.fixed_point:
                break
        else:
            raise PassError(f"passes did not reach a fixed point in {MAX_FIXED_POINT_ITERATIONS} rounds")
        return ManagerResult(gm, any_modified, history)

    def _iterate(self):
        if not self.progress or len(self.passes) < 2:
            return self.passes
        from tqdm.auto import tqdm

        return tqdm(self.passes, desc="sparsifx passes", unit="pass")

    def _run_one(self, p: PassBase, gm: fx.GraphModule, history: list[PassRecord]):
        self.ensure_analyses(gm, p.requires_analyses, optional=p.uses_analyses, pass_label=p.label)
        check = self.verify and p.preserves_semantics and self.example_inputs is not None
        waived = p.exactness_waived(gm) if check else None
        if waived:
            log.warning("pass %s is not verified: %s", p.label, waived)
            check = False
        reference = run_model(gm, self.example_inputs) if check else None
        log.info("running pass %s", p.label)
        try:
            with managed_call():
                result = p(gm)
        except PassCrash as exc:
            if exc.pass_name != p.label:
                raise
            raise PassCrash(p.label, exc.detail, [h.name for h in history]) from exc.__cause__
        if result.modified:
            self._invalidate(p.invalidates_analyses)
            if check:
                self._compare(p, reference, run_model(result.gm, self.example_inputs), history)
        history.append(PassRecord(p.label, result.modified, check and result.modified, waived))
        return result.gm, result.modified

    def ensure_analyses(
        self, gm: fx.GraphModule, names: Iterable[str], optional: Iterable[str] = (), pass_label: str = ""
    ) -> None:
        """Run each analysis of ``names`` (required) and ``optional`` whose result is not valid any more.

        Inputs: the manager's ``example_inputs``, else ``gm.meta["example_inputs"]``. Without inputs an analysis
        that needs them counts as valid when the module already has its result; a required one that is missing
        raises ``PreconditionError``; an optional one is left to the pass."""
        optional = [n for n in optional if n not in names]
        inputs = example_inputs_of(gm, self.example_inputs)
        for name in [*names, *optional]:
            if name in self._valid:
                continue
            analysis = ANALYSES.get(name)
            if isinstance(analysis, Analysis) and analysis.needs_inputs and inputs is None:
                if analysis.present(gm):
                    self._valid.add(name)
                    continue
                if name in optional:
                    continue
                raise missing(pass_label or "?", name, analysis)
            analysis(gm, inputs)
            self._valid.add(name)

    def _invalidate(self, names: Iterable[str]) -> None:
        names = set(names)
        self._valid = set() if ALL_ANALYSES in names else self._valid - names

    def _compare(self, p: PassBase, expected: Any, actual: Any, history: list[PassRecord]) -> None:
        try:
            torch.testing.assert_close(actual, expected, rtol=self.tolerance.rtol, atol=self.tolerance.atol)
        except AssertionError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "outputs differ"
            detail = " ".join(str(exc).split())[:400] or first_line
            raise VerificationError(p.label, [h.name for h in history], detail) from None
