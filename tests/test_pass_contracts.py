"""The pass contract and the manager: exact `modified`, contract violations, verification, fixed point, analyses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx.pass_manager as pm
from sparsifx import (
    PassBase,
    PassError,
    PassManager,
    PassResult,
    PostconditionError,
    PreconditionError,
    VerificationError,
    sparsify,
)
from sparsifx.pass_base import PassCrash, PassDefinitionError
from sparsifx.passes.fold_bn import FoldBatchNorm
from sparsifx.passes.magnitude import MagnitudePruning
from sparsifx.registry import ANALYSES, register_pass
from sparsifx.tracing import trace


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(x.mean((2, 3))))


@pytest.fixture
def small():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    return trace(Small().eval(), (x,)), x


class Noop(PassBase):
    in_place = True
    name = "noop"

    def call(self, gm):
        return PassResult(gm, False)


class DropOneRelu(PassBase):
    """relu(x) -> x, one node per call (needs a fixed point to remove them all)."""

    in_place = True
    name = "drop_one_relu"

    def call(self, gm):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                gm.recompile()
                return PassResult(gm, True)
        return PassResult(gm, False)


class Breaker(PassBase):
    """Claims to preserve semantics but scales the last layer."""

    in_place = True
    name = "breaker"
    preserves_semantics = True

    def call(self, gm):
        with torch.no_grad():
            gm.fc.weight.mul_(2.0)
        return PassResult(gm, True)


def test_modified_exact_for_builtin_passes(small):
    gm, _ = small
    assert Noop()(gm).modified is False
    assert MagnitudePruning(sparsity=0.0)(gm).modified is False
    assert FoldBatchNorm()(gm).modified is True
    assert FoldBatchNorm()(gm).modified is False
    result = PassManager([Noop(), FoldBatchNorm(), MagnitudePruning(sparsity=0.0)]).run(gm)
    assert result.modified is False and [h.modified for h in result.history] == [False, False, False]


def test_in_place_pass_returning_new_module_is_caught(small):
    class Copies(PassBase):
        in_place = True
        name = "copies"

        def call(self, gm):
            return PassResult(copy.deepcopy(gm), True)

    with pytest.raises(PostconditionError, match="in_place"):
        Copies()(small[0])


def test_non_passresult_is_caught(small):
    class ReturnsModule(PassBase):
        in_place = True
        name = "returns_module"

        def call(self, gm):
            return gm

    with pytest.raises(PostconditionError, match="not PassResult"):
        ReturnsModule()(small[0])


def test_functional_pass_mutating_in_place_is_caught(small):
    class Functional(PassBase):
        name = "functional"
        in_place = False

        def __init__(self, copy_first: bool):
            self.copy_first = copy_first

        def call(self, gm):
            out = copy.deepcopy(gm) if self.copy_first else gm
            return DropOneRelu().call(out)

    gm, x = small
    with pytest.raises(PostconditionError, match="functional"):
        Functional(copy_first=False)(copy.deepcopy(gm))
    code = gm.code
    result = Functional(copy_first=True)(gm)
    assert result.modified and result.gm is not gm and gm.code == code


def test_malformed_graph_precondition_and_crash_are_typed(small):
    class Malformed(PassBase):
        in_place = True
        name = "malformed"

        def call(self, gm):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            first = next(n for n in gm.graph.nodes if n.op == "call_module")
            with gm.graph.inserting_before(first):  # uses a value before it is defined
                gm.graph.call_function(torch.neg, (out.args[0],))
            return PassResult(gm, True)

    class Crashes(PassBase):
        in_place = True
        name = "crashes"

        def call(self, gm):
            raise ValueError("boom")

    with pytest.raises(PostconditionError, match="malformed graph"):
        Malformed()(small[0])
    with pytest.raises(PassError, match="crashes.*ValueError: boom"):
        Crashes()(small[0])
    with pytest.raises(PreconditionError):
        Noop()(Small())


def test_verify_names_breaking_pass_and_predecessors(small):
    gm, x = small
    passes = [Noop(), MagnitudePruning(sparsity=0.5), FoldBatchNorm(), Breaker(), Noop()]
    with pytest.raises(VerificationError) as info:
        PassManager(passes, example_inputs=(x,), verify=True).run(gm)
    assert info.value.pass_name == "breaker"
    assert info.value.passes_before == ["noop", "magnitude", "fold_bn"]
    assert "breaker" in str(info.value) and "noop, magnitude, fold_bn" in str(info.value)


def test_verify_off_or_not_claimed_does_not_raise(small):
    gm, x = small
    PassManager([Breaker()], example_inputs=(x,), verify=False).run(gm)

    class Honest(Breaker):
        name = "honest"
        preserves_semantics = False

    result = PassManager([Honest()], example_inputs=(x,), verify=True).run(gm)
    assert result.history[0].verified is False


def test_verify_on_torchvision_resnet18_via_recipe():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)

    @register_pass("test_contracts_breaker", replace=True)
    class RecipeBreaker(Breaker):
        def call(self, gm):
            with torch.no_grad():
                gm.fc.bias.add_(1.0)
            return PassResult(gm, True)

    recipe = {"stages": [{"pass": "fold_bn"}, {"pass": "test_contracts_breaker"}]}
    with pytest.raises(VerificationError) as info:
        sparsify(torchvision.models.resnet18(weights=None), recipe, (x,), verify=True)
    assert info.value.pass_name == "test_contracts_breaker" and info.value.passes_before == ["fold_bn"]


def test_fixed_point_stops(small, monkeypatch):
    gm, x = small
    n_relu = sum(n.target is torch.relu for n in gm.graph.nodes)
    assert n_relu == 2
    once = PassManager([DropOneRelu()]).run(copy.deepcopy(gm))
    assert once.modified and len(once.history) == 1
    result = PassManager([DropOneRelu(), Noop()], fixed_point=True).run(gm)
    assert [h.modified for h in result.history] == [True, False, True, False, False, False]
    assert not any(n.target is torch.relu for n in result.gm.graph.nodes)

    class Liar(PassBase):
        in_place = True
        name = "liar"

        def call(self, gm):
            return PassResult(gm, True)

    monkeypatch.setattr(pm, "MAX_FIXED_POINT_ITERATIONS", 5)
    with pytest.raises(PassError, match="fixed point"):
        PassManager([Liar()], fixed_point=True).run(gm)


def test_analyses_rerun_only_after_invalidation(small):
    gm, x = small
    calls = []
    ANALYSES.register("test_contracts_counter", lambda g, inputs: calls.append(len(g.graph.nodes)), replace=True)

    def make(name, modifies, invalidates):
        attrs = {
            "name": name,
            "in_place": True,
            "requires_analyses": ("test_contracts_counter",),
            "invalidates_analyses": invalidates,
            "call": lambda self, g: PassResult(g, modifies),
        }
        return type(name, (PassBase,), attrs)()

    passes = [
        make("a", True, ("test_contracts_counter",)),
        make("b", False, ("*",)),
        make("c", True, ("other",)),
        make("d", False, ()),
        make("e", True, ("*",)),
        make("f", False, ()),
    ]
    PassManager(passes, example_inputs=(x,)).run(gm)
    # runs before a; a invalidated it -> runs before b; b unmodified; c invalidates another key; e invalidates all
    assert len(calls) == 3


def test_shapes_analysis_rerun_after_a_pass_changed_the_graph(small):
    gm, x = small

    class NeedsShapes(PassBase):
        in_place = True
        name = "needs_shapes"
        requires_analyses = ("shapes",)
        seen: list = []

        def call(self, g):
            type(self).seen.append(sum("tensor_meta" in n.meta for n in g.graph.nodes))
            return PassResult(g, False)

    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    PassManager([NeedsShapes(), DropOneRelu(), NeedsShapes()], example_inputs=(x,)).run(gm)
    assert NeedsShapes.seen == [len(gm.graph.nodes) + 1, len(gm.graph.nodes)]


def test_in_place_must_be_stated():
    with pytest.raises(PassDefinitionError, match="must state in_place"):

        class Silent(PassBase):
            name = "silent"

            def call(self, gm):
                return PassResult(gm, False)

    with pytest.raises(TypeError, match="in_place"):  # PassDefinitionError is a TypeError and a SparsifxError
        type("Built", (PassBase,), {"call": lambda self, gm: PassResult(gm, False)})

    with pytest.raises(PassDefinitionError, match="got 1"):

        class NotBool(PassBase):
            in_place = 1

            def call(self, gm):
                return PassResult(gm, False)

    class Abstract(PassBase):  # no call: a base for passes, which state in_place themselves
        pass

    with pytest.raises(PassDefinitionError):
        register_pass("test_contracts_abstract", replace=True)(Abstract)

    class Functional(Abstract):
        in_place = False

        def call(self, gm):
            return PassResult(gm, False)

    assert Functional.in_place is False


def test_exceptions_in_requires_and_ensures_are_wrapped(small):
    class BadRequires(PassBase):
        in_place = True
        name = "bad_requires"

        def requires(self, gm):
            raise KeyError("plan")

        def call(self, gm):
            return PassResult(gm, False)

    class BadEnsures(Noop):
        name = "bad_ensures"

        def ensures(self, gm):
            raise ValueError("broken invariant")

    with pytest.raises(PreconditionError, match=r"bad_requires.*precondition.*KeyError") as info:
        BadRequires()(small[0])
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(PostconditionError, match=r"bad_ensures.*postcondition.*ValueError: broken invariant"):
        BadEnsures()(small[0])


def test_crash_in_a_pipeline_names_the_pass_and_the_passes_before_it(small):
    gm, x = small

    class Crashes(PassBase):
        in_place = True
        name = "crashes"

        def call(self, gm):
            raise ValueError("boom")

    with pytest.raises(
        PassError,
        match=r"pass 'crashes' failed \(passes run before it: noop, fold_bn\): "
        r"ValueError: boom",
    ) as info:
        PassManager([Noop(), FoldBatchNorm(), Crashes(), Noop()], example_inputs=(x,)).run(gm)
    assert isinstance(info.value, PassCrash) and info.value.pass_name == "crashes"
    assert info.value.passes_before == ["noop", "fold_bn"] and isinstance(info.value.__cause__, ValueError)
    with pytest.raises(PassError, match=r"passes run before it: none"):
        PassManager([Crashes()]).run(gm)


def test_missing_required_analysis_is_a_precondition_error(small):
    gm, x = small

    class NeedsShapes(PassBase):
        in_place = True
        name = "needs_shapes_strict"
        requires_analyses = ("shapes",)

        def call(self, g):
            return PassResult(g, False)

    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    with pytest.raises(
        PreconditionError,
        match=r"'needs_shapes_strict' needs the 'shapes' analysis.*tensor_meta.*"
        r"example_inputs",
    ):
        PassManager([NeedsShapes()]).run(gm)
    gm.meta["example_inputs"] = (x,)  # the inputs sparsify traced with: the manager provides the analysis
    PassManager([NeedsShapes()]).run(gm)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes)


def test_a_pass_called_directly_gets_its_declared_analyses_from_the_example_inputs(small):
    gm, x = small
    seen = []

    class UsesShapes(PassBase):
        in_place = True
        name = "uses_shapes"
        uses_analyses = ("shapes",)

        def call(self, g):
            seen.append(all("tensor_meta" in n.meta for n in g.graph.nodes))
            return PassResult(g, False)

    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    UsesShapes()(gm)  # no example inputs: not provided, the pass decides
    PassManager([UsesShapes()]).run(gm)  # optional: not an error in the manager either
    gm.meta["example_inputs"] = (x,)
    UsesShapes()(gm)
    assert seen == [False, False, True]


def test_core_imports_no_pass_module_and_builtins_register_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, sparsifx, sparsifx.accounting, sparsifx.reporting\n"
        "assert not [m for m in sys.modules if m.startswith('sparsifx.passes')], 'passes imported'\n"
        "from sparsifx.registry import PASSES\n"
        "assert 'magnitude' in PASSES.names() and PASSES.get('shrink').name == 'shrink'\n"
        "import torch\n"
        "gm = sparsifx.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), "
        "{'stages': [{'pass': 'magnitude', 'sparsity': 0.5}]})\n"
        "assert callable(sparsifx.report) and sparsifx.report(gm).total_nonzeros == 12\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
