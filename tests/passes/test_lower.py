"""Pass ``lower``: lowered == masked for Linear and Conv2d, plans, forced backends, report, modified."""

import pytest
import torch
import torch.nn as nn
import torchvision

import sparsifx
from sparsifx.backends import cost_model
from sparsifx.backends.sparse_modules import SparseConv2d, SparseLinear
from sparsifx.errors import RecipeError
from sparsifx.masking import MaskedLinear, masked_layers, set_mask
from sparsifx.pass_manager import PassManager
from sparsifx.passes.lower import Lower
from sparsifx.recipe import Recipe

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A real (small, fast) calibration of every kernel on this machine."""
    path = tmp_path_factory.mktemp("sfx_cache")
    cost_model.load_or_calibrate(None, path, reps=3, sizes=(64, 256), batches=(1, 32))
    return str(path)


def mask_all(gm, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            set_mask(gm, name, (torch.rand(mod.weight.shape, generator=g) >= sparsity).float())
    return gm


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_lowered_mlp_matches_masked(cache, sparsity, mode):
    gm = mask_all(sparsifx.trace(mlp()), sparsity)
    xs = [torch.randn(b, 64) for b in (1, 7, 64, 300)]
    with torch.no_grad():
        refs = [gm(x) for x in xs]
    result = Lower(cache_dir=cache)(gm)
    assert result.modified and result.gm is gm
    gm.graph.lint()
    assert not list(masked_layers(gm))
    with mode():
        for x, ref in zip(xs, refs):
            torch.testing.assert_close(gm(x), ref, **TOL)
    extra = gm.meta["report_extra"]
    assert set(extra) == {"0", "2", "4"}
    assert all({"backend", "density", "predicted_speedup"} <= set(v) for v in extra.values())
    assert extra["2"]["density"] == pytest.approx(1 - sparsity, abs=0.05)
    assert Lower(cache_dir=cache)(gm).modified is False  # nothing masked is left


@pytest.mark.parametrize("backend", ["csr", "csr_tiled", "dense_ort", "dense"])
def test_forced_backend_by_name(cache, backend):
    gm = mask_all(sparsifx.trace(mlp()), 0.8)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = gm(x)
    recipe = Recipe.from_dict(
        {"stages": [{"pass": "lower", "cache_dir": cache, "by_name": {"2": {"backend": backend}}}]}
    )
    out = PassManager.from_recipe(recipe, example_inputs=(x,), verify=True).run(gm).gm
    layer = out.get_submodule("2")
    if backend == "dense":
        assert type(layer) is nn.Linear and int((layer.weight == 0).sum()) > 0
    else:
        assert isinstance(layer, SparseLinear) and layer.plan == ((None, backend),)
    assert out.meta["report_extra"]["2"]["backend"] == backend
    with torch.inference_mode():
        torch.testing.assert_close(out(x), ref, **TOL)


def test_bad_backend_is_a_recipe_error(cache):
    with pytest.raises(RecipeError, match="backend"):
        Lower(backend="cusparse")
    gm = mask_all(sparsifx.trace(mlp()), 0.8)
    sel = sparsifx.selection.LayerSelection.from_dict({"by_name": {"0": {"backend": "fast"}}})
    with pytest.raises(RecipeError, match="by_name.0"):
        Lower(cache_dir=cache, selection=sel)(gm)


def test_dense_model_untouched(cache):
    gm = sparsifx.trace(mlp())
    result = Lower(cache_dir=cache)(gm)
    assert result.modified is False
    assert all(type(m) is not SparseLinear for m in gm.modules())


def test_plan_follows_cost_model(cache):
    low = Lower(cache_dir=cache)
    plan_sparse, speedup = low.plan_linear(512, 512, nnz=512 * 512 // 100)
    plan_dense, _ = low.plan_linear(512, 512, nnz=512 * 512)
    cal = low.calibration()
    for plan, nnz in ((plan_sparse, 2621), (plan_dense, 512 * 512)):
        assert plan[-1][0] is None
        for bound, kernel in plan:  # every planned kernel is the cheapest eligible one at its batch point
            b = bound or max(cal.batches)
            point = max(p for p in cal.batches if p <= b)
            cost = {k: cal.linear_ms(k, 512, 512, nnz, point) for k in cal.linear}
            assert cost[kernel] <= cost["dense"] * 1.0001
    assert speedup > 0
    single = Lower(cache_dir=cache, batch_size=32).plan_linear(512, 512, 2621)[0]
    assert len(single) == 1


@pytest.mark.parametrize("backend,batch", [("auto", 1), ("csr_tiled", 3)])
def test_resnet18_convs(cache, backend, batch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(batch, 3, 32, 32)
    gm = mask_all(sparsifx.trace(model), 0.9)
    with torch.no_grad():
        ref = gm(x)
    low = Lower(cache_dir=cache, backend=backend)
    gm.meta["example_inputs"] = (x,)
    result = low(gm)
    assert result.modified
    kinds = {type(m) for m in gm.modules()}
    if backend == "csr_tiled":
        assert SparseConv2d in kinds and SparseLinear in kinds
        assert gm.meta["report_extra"]["layer1.0.conv1"]["backend"] == "csr_tiled"
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), ref, rtol=1e-3, atol=1e-3)


def test_conv_without_shapes_needs_example_inputs(cache):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    gm = mask_all(sparsifx.trace(model), 0.9)
    with pytest.raises(sparsifx.PreconditionError, match="example_inputs"):
        Lower(cache_dir=cache)(gm)


def test_sparsify_one_liner(cache):
    x = torch.randn(4, 64)
    model = mlp()
    gm0 = mask_all(sparsifx.trace(model), 0.95)
    out = sparsifx.sparsify(gm0, {"stages": [{"pass": "lower", "cache_dir": cache}]}, example_inputs=(x,), verify=True)
    with torch.no_grad():
        torch.testing.assert_close(out(x), gm0(x), **TOL)
    assert isinstance(gm0.get_submodule("0"), MaskedLinear)  # the input model is not mutated


def test_kernel_subset(cache, monkeypatch):
    gm = mask_all(sparsifx.trace(mlp()), 0.99)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = gm(x)
    lower = Lower(cache_dir=cache, kernels=["csr"])
    # deterministic costs (a loaded machine makes a 3-rep calibration noisy): csr_tiled would be the
    # cheapest, but it is outside the subset; csr beats dense by more than min_speedup
    costs = {"csr_tiled": 0.1, "csr": 0.5, "dense": 1.0}
    monkeypatch.setattr(
        type(lower.calibration()), "linear_ms", lambda self, kernel, out_f, in_f, nnz, batch: costs.get(kernel, 2.0)
    )
    lower(gm)  # any sparse choice must be csr
    kernels = {k for m in gm.modules() if isinstance(m, SparseLinear) for _, k in m.plan}
    assert kernels <= {"csr", "dense"} and "csr" in kernels
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), ref, **TOL)
