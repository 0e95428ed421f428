"""``torch.compile`` on what sparsifx produces: masked, shrunk, training-time (controller attached) and lowered
models, compiled outputs equal to eager.

Backends: ``aot_eager`` (Dynamo capture + AOTAutograd, the parts that meet sparsifx's modules, masks, custom
autograd functions and hooks) runs in the default suite; ``inductor`` (C++ code generation on CPU, 20-50 s per
model on a loaded 2-core machine) runs for a tiny MLP by default and for the rest under ``-m slow``.

Lowered models (``lower``) do not compile as they are: the sparse kernels are not traceable by Dynamo (``csr``
enters ``warnings.catch_warnings``, ``csr_tiled`` is a pybind C++ function, not a registered custom op), so
``fullgraph=True`` raises ``torch._dynamo.exc.Unsupported``; without ``fullgraph`` the graph break inside
``SparseLinear`` crashes Dynamo itself (torch 2.14: ``IndexError`` in automatic-dynamic stride handling of the
packed CSR buffers; marked xfail). Running the lowered layers eagerly (``torch.compiler.disable`` on their
``forward``) and compiling the rest works and matches eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx

dynamo = pytest.importorskip("torch._dynamo")
if not dynamo.is_dynamo_supported():  # pragma: no cover
    pytest.skip("torch.compile is not supported on this Python/platform", allow_module_level=True)

INDUCTOR_TOL = dict(rtol=1e-4, atol=1e-5)  # inductor fuses and reorders float arithmetic
SLOW_INDUCTOR = pytest.param("inductor", marks=pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def _assert_compiled_matches(gm: nn.Module, inputs: list[torch.Tensor], backend: str, fullgraph: bool = True):
    compiled = torch.compile(gm, backend=backend, fullgraph=fullgraph)
    tol = INDUCTOR_TOL if backend == "inductor" else {}
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(compiled(x), gm(x), **tol)


@pytest.mark.parametrize("backend", ["aot_eager", SLOW_INDUCTOR])
def test_masked_cnn_compiles(backend):
    x = torch.randn(2, 3, 8, 8)
    gm = sparsifx.sparsify(cnn(), {"stages": [{"pass": "magnitude", "sparsity": 0.7}]}, example_inputs=(x,)).eval()
    assert any(type(m).__name__ == "MaskedConv2d" for m in gm.modules())
    _assert_compiled_matches(gm, [x, torch.randn(2, 3, 8, 8)], backend)


def test_masked_mlp_compiles_with_inductor():
    x = torch.randn(4, 16)
    gm = sparsifx.sparsify(mlp(), {"stages": [{"pass": "magnitude", "sparsity": 0.8}]}, example_inputs=(x,)).eval()
    _assert_compiled_matches(gm, [x, torch.randn(4, 16)], "inductor")


@pytest.mark.parametrize("backend", ["aot_eager", SLOW_INDUCTOR])
def test_shrunk_cnn_compiles(backend):
    x = torch.randn(2, 3, 8, 8)
    recipe = {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]}
    gm = sparsifx.sparsify(cnn(), recipe, example_inputs=(x,)).eval()
    assert gm.get_submodule("0").out_channels < 8  # physically smaller
    _assert_compiled_matches(gm, [x, torch.randn(2, 3, 8, 8)], backend)


def _train(method: str, backend: str | None, steps: int = 4):
    torch.manual_seed(0)
    stage = {"pass": method, "sparsity": 0.7, **({"delta_t": 2} if method == "rigl" else {})}
    gm = sparsifx.sparsify(mlp(), {"stages": [stage]}, example_inputs=(torch.randn(2, 16),))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    sparsifx.attach(gm, opt, steps_per_epoch=steps, epochs=1)
    forward = torch.compile(gm, backend=backend) if backend else gm
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()  # eager: the controller's optimizer hooks run here
        losses.append(loss.detach())
    return gm, torch.stack(losses)


@pytest.mark.parametrize("method", ["static", "rigl"])
@pytest.mark.parametrize("backend", ["aot_eager", SLOW_INDUCTOR])
def test_training_with_controller_compiles(method, backend):
    """Compiled forward/backward, eager optimizer step with the controller's hooks: the same training as eager.
    (The controller's FLOP-counting forward hooks graph-break once per masked layer: they read the density.)"""
    got, got_loss = _train(method, backend)
    want, want_loss = _train(method, None)
    tol = INDUCTOR_TOL if backend == "inductor" else {}
    torch.testing.assert_close(got_loss, want_loss, **tol)
    torch.testing.assert_close(dict(got.named_parameters()), dict(want.named_parameters()), **tol)
    ctrl, ref = sparsifx.passes.training.controller(got), sparsifx.passes.training.controller(want)
    assert ctrl.step == ref.step == 4
    assert [h["step"] for h in ctrl.history] == [h["step"] for h in ref.history]
    assert (method == "rigl") == bool(ref.history)
    for name in ref.names:
        assert torch.equal(ctrl.layers[name].mask, ref.layers[name].mask)
    assert ctrl.training_flops()["training_flops"] == pytest.approx(ref.training_flops()["training_flops"])


def _lowered(backend: str) -> tuple[nn.Module, torch.Tensor]:
    from sparsifx.backends.sparse_kernels import SPARSE_KERNELS

    if not SPARSE_KERNELS.get(backend).available():
        pytest.skip(f"sparse kernel {backend} is not available here")
    x = torch.randn(4, 16)
    recipe = {"stages": [{"pass": "magnitude", "sparsity": 0.9}, {"pass": "lower", "backend": backend}]}
    gm = sparsifx.sparsify(mlp(), recipe, example_inputs=(x,)).eval()
    assert {type(m).__name__ for m in gm.modules()} >= {"SparseLinear"}
    with torch.no_grad():
        gm(x)  # eager first, as in use: the layers bind their kernels (csr_tiled: loads the C++ extension)
    return gm, x


@pytest.mark.parametrize("kernel,reason", [("csr", "_warnings"), ("csr_tiled", "pybind")])
def test_lowered_model_does_not_compile_as_one_graph(kernel, reason):
    gm, x = _lowered(kernel)
    with torch.no_grad(), pytest.raises(dynamo.exc.Unsupported, match=reason):
        torch.compile(gm, backend="aot_eager", fullgraph=True)(x)


@pytest.mark.xfail(
    strict=False,
    reason="torch 2.14: Dynamo crashes (IndexError in automatic-dynamic stride "
    "handling) resuming after the graph break inside SparseLinear",
)
def test_lowered_model_compiles_with_graph_breaks():
    gm, x = _lowered("csr")
    _assert_compiled_matches(gm, [x], "aot_eager", fullgraph=False)


@pytest.mark.parametrize("kernel", ["csr", "csr_tiled"])
@pytest.mark.parametrize("backend", ["aot_eager", SLOW_INDUCTOR])
def test_lowered_model_compiles_around_eager_sparse_layers(kernel, backend):
    from sparsifx.backends.sparse_modules import SparseLinear

    gm, x = _lowered(kernel)
    for module in gm.modules():
        if isinstance(module, SparseLinear):
            module.forward = torch.compiler.disable(module.forward)
    _assert_compiled_matches(gm, [x, torch.randn(4, 16)], backend, fullgraph=False)
