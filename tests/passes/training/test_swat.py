"""SWAT (docs/algorithms.md#swat): Top-K forward/backward semantics, compressed saves, variants, pass, finalize."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from sparsifx import RecipeError, sparsify
from sparsifx.errors import PreconditionError
from sparsifx.passes.training import kernels, topk
from sparsifx.passes.training.swat import SWAT, swat_controller
from sparsifx.passes.training.swat_control import momentum_allocation
from sparsifx.passes.training.swat_finalize import SWATFinalize
from sparsifx.passes.training.swat_layers import (
    LeanMaxPool2d,
    LeanReLU,
    SWATConv2d,
    SWATLayerConfig,
    SWATLinear,
    swap_class,
    swat_layers,
)
from sparsifx.tracing import trace


def make_swat(module: nn.Module, sparsity: float, **cfg) -> nn.Module:
    cls = SWATLinear if isinstance(module, nn.Linear) else SWATConv2d
    layer = swap_class(module, cls)
    layer._init_swat(sparsity, SWATLayerConfig(every_call=isinstance(module, nn.Linear), **cfg))
    return layer


def topk_thr(t: torch.Tensor, s: float) -> torch.Tensor:
    """Reference threshold Top-K: keep |t| >= k-th largest |t| (sort based)."""
    k = math.ceil((1 - s) * t.numel())
    thr = t.abs().flatten().sort(descending=True).values[k - 1]
    return t * (t.abs() >= thr)


def saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


# --- 1. s = 0 equals dense ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: nn.Linear(20, 7), lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1)])
def test_zero_sparsity_equals_dense(make):
    torch.manual_seed(0)
    dense = make()
    layer = make_swat(make(), 0.0)
    layer.load_state_dict(dense.state_dict(), strict=False)
    x = torch.randn(4, 20) if isinstance(dense, nn.Linear) else torch.randn(2, 3, 9, 9)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd, ys = dense(xd), layer(xs)
    torch.testing.assert_close(ys, yd)
    g = torch.randn_like(yd)
    yd.backward(g)
    ys.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad)
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


def test_zero_sparsity_resnet18_equals_dense():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    dense = trace(net).train()
    result = SWAT(sparsity=0.0, dense_first_layer=False)(trace(net))
    gm = result.gm.train()
    assert result.modified
    gm.graph.lint()
    yd, ys = dense(x), gm(x)
    torch.testing.assert_close(ys, yd)
    yd.square().sum().backward()
    ys.square().sum().backward()
    for (name, pd), (_, ps) in zip(dense.named_parameters(), gm.named_parameters()):
        torch.testing.assert_close(ps.grad, pd.grad, msg=name)


# --- 2.-4. forward, saved activations, gradients ------------------------------------------------------------------
@pytest.fixture(params=["numpy", "torch"])
def backend(request, monkeypatch):
    """Run a test with the CPU NumPy kernels and with the torch kernels (the GPU path)."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "NUMPY_DTYPES", ())
    return request.param


@pytest.mark.parametrize("exact", [False, True])
def test_linear_forward_saved_and_grads(exact, backend):
    torch.manual_seed(1)
    s = 0.8
    layer = make_swat(nn.Linear(30, 12), s, exact=exact)
    x = torch.randn(16, 30, requires_grad=True)
    y, saved = saved_tensors(lambda: layer(x))
    w_s = topk_thr(layer.weight.detach(), s)
    torch.testing.assert_close(y, F.linear(x.detach(), w_s, layer.bias.detach()))  # dense x, Top-K W
    k = math.ceil((1 - s) * x.numel())
    values = [t for t in saved if t.dtype == torch.float32 and t.dim() == 1 and t.numel() != 12]
    assert [v.numel() for v in values] == [k]
    assert not any(t.shape == x.shape for t in saved)  # no dense copy of x is kept
    gy = torch.randn_like(y)
    y.backward(gy)
    x_s = topk_thr(x.detach(), s)
    torch.testing.assert_close(layer.weight.grad, gy.t() @ x_s)
    torch.testing.assert_close(x.grad, gy @ w_s)
    dropped = w_s == 0
    assert dropped.sum() > 0 and (layer.weight.grad[dropped] != 0).all()  # dense-shaped weight gradient


def test_conv_forward_and_grads_match_topk_reference(backend):
    torch.manual_seed(2)
    s = 0.7
    layer = make_swat(nn.Conv2d(4, 6, 3, padding=1, bias=False), s, period=1)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    y = layer(x)
    w_s = topk_thr(layer.weight.detach(), s)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w_s.clone().requires_grad_()
    torch.testing.assert_close(y, F.conv2d(x_ref, w_ref, padding=1))
    gy = torch.randn_like(y)
    y.backward(gy)
    (gx_ref,) = torch.autograd.grad(F.conv2d(x_ref, w_ref, padding=1), x_ref, gy)
    x_s = topk_thr(x.detach(), s).requires_grad_()
    (gw_ref,) = torch.autograd.grad(F.conv2d(x_s, w_ref, padding=1), w_ref, gy)
    torch.testing.assert_close(x.grad, gx_ref)
    torch.testing.assert_close(layer.weight.grad, gw_ref)


def test_exact_mode_keeps_exactly_k_with_ties():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    mask, thr = topk.exact_mask(scores, 3)
    assert thr == 2.0 and mask.tolist() == [True, False, True, True, False, False]
    tmask, _ = topk.threshold_mask(scores, 3)
    assert int(tmask.sum()) == 4  # threshold mode keeps the ties


# --- 5. period: stale threshold reuse -------------------------------------------------------------------------------
def test_period_reuses_stored_threshold_on_non_recompute_steps(backend):
    torch.manual_seed(3)
    layer = make_swat(nn.Conv2d(3, 8, 3), 0.9, period=3)
    x = torch.randn(2, 3, 6, 6)
    layer(x).sum().backward()  # step 0: recompute
    thr0 = float(layer.thr_w)
    assert int((layer.weight.abs() >= thr0).sum()) == math.ceil(0.1 * layer.weight.numel())
    for _ in (1, 2):
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))  # an optimizer step
        y = layer(x)
        assert float(layer.thr_w) == thr0
        torch.testing.assert_close(
            y, F.conv2d(x, layer.weight.detach() * (layer.weight.detach().abs() >= thr0), layer.bias.detach())
        )
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer(x)  # step 3: recompute
    assert float(layer.thr_w) != thr0
    assert int((layer.weight.abs() >= layer.thr_w).sum()) == math.ceil(0.1 * layer.weight.numel())


def test_warmup_recomputes_every_step():
    layer = make_swat(nn.Conv2d(3, 4, 3), 0.5, period=100, warmup_steps=2)
    x = torch.randn(1, 3, 5, 5)
    thrs = []
    for _ in range(3):
        layer(x)
        thrs.append(float(layer.thr_w))
        with torch.no_grad():
            layer.weight.mul_(2.0)
    assert thrs[1] == 2 * thrs[0] and thrs[2] == thrs[1]


# --- 6. structured ---------------------------------------------------------------------------------------------------
def test_structured_kernel_count_and_zero_kernels(backend):
    torch.manual_seed(4)
    s = 0.6
    layer = make_swat(nn.Conv2d(6, 10, 3), s, structured=True)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    w_eff = layer.effective_weight()
    kernel_nnz = w_eff.abs().sum((2, 3)) != 0
    assert int(kernel_nnz.sum()) == math.ceil((1 - s) * 60)
    assert ((w_eff != 0) == kernel_nnz[:, :, None, None].expand_as(w_eff)).all()  # kept kernels whole
    assert (layer.weight.grad[~kernel_nnz] != 0).any()


# --- 7. the pass ------------------------------------------------------------------------------------------------------
def test_pass_on_resnet18_leaves_bn_bias_first_layer():
    net = torchvision.models.resnet18(num_classes=10)
    gm = trace(net)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    result = SWAT(sparsity=0.9)(gm)
    assert result.modified and result.gm is gm
    gm.graph.lint()
    assert type(gm.conv1) is nn.Conv2d and type(gm.fc) is SWATLinear
    assert all(type(m) is nn.BatchNorm2d for n, m in gm.named_modules() if "bn" in n or n.endswith("downsample.1"))
    assert type(gm.relu) is LeanReLU and type(gm.maxpool) is LeanMaxPool2d
    names = [n for n, _ in swat_layers(gm)]
    assert len(names) == 20 and "conv1" not in names  # 19 convs + fc
    for n, p in gm.named_parameters():  # nothing is pruned in place: biases, BN and dense weights intact
        assert torch.equal(p, before[n]), n
    assert gm.meta["swat"]["layers"]["layer1.0.conv1"] == 0.9
    with pytest.raises(PreconditionError):
        SWAT()(gm)
    gm2 = SWAT(dense_last_layer=True, lean_relu=False, lean_maxpool=False)(trace(net)).gm
    assert type(gm2.fc) is nn.Linear and type(gm2.relu) is nn.ReLU


def test_pass_selection_overrides_and_erk():
    net = mlp()
    gm = sparsify(net, {"stages": [{"pass": "swat", "sparsity": 0.9, "by_name": {"3": {"sparsity": 0.5}}}]})
    assert gm.get_submodule("3").sparsity == 0.5 and gm.get_submodule("5").sparsity == 0.9
    gm = SWAT(sparsity=0.9, variant="erk", dense_first_layer=False)(trace(net)).gm
    s = {n: m.sparsity for n, m in swat_layers(gm)}
    n = {nm: m.weight.numel() for nm, m in swat_layers(gm)}
    assert abs(sum((1 - s[k]) * n[k] for k in s) - 0.1 * sum(n.values())) <= 2
    assert s["1"] > s["5"]  # ERK: the big layer is sparser


def test_recipe_errors():
    with pytest.raises(RecipeError):
        SWAT.from_params({"variant": "filter"})
    with pytest.raises(RecipeError):
        SWAT.from_params({"sparsity": 1.0})
    with pytest.raises(RecipeError):
        SWAT.from_params({"topk_period": 0})


class FunctionalRelus(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = self.b(x).relu()
        y = self.c(x)
        return torch.relu_(y) + x.sum(1, keepdim=True)


def test_functional_relus_replaced_and_exact():
    torch.manual_seed(5)
    net = FunctionalRelus()
    dense = trace(net)
    gm = SWAT(sparsity=0.0, dense_first_layer=False)(trace(net)).gm
    functions = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    lean = [n.target for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is LeanReLU]
    assert len(lean) == 3 and not {F.relu, torch.relu, torch.relu_} & set(functions)
    assert [gm.get_submodule(t).inplace for t in lean] == [False, False, True]
    x = torch.randn(5, 8)
    yd, ys = dense(x), gm(x)
    torch.testing.assert_close(ys, yd)
    yd.sum().backward()
    ys.sum().backward()
    for (name, pd), (_, ps) in zip(dense.named_parameters(), gm.named_parameters()):
        torch.testing.assert_close(ps.grad, pd.grad, msg=name)
    final = sparsify(gm, {"stages": [{"pass": "swat_finalize"}]})  # retraces the lean ReLU submodules
    assert not any(isinstance(m, (LeanReLU, SWATLinear)) for m in final.modules())
    torch.testing.assert_close(final(x), dense(x))


def test_lean_relu_saves_one_bit_per_element():
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    y, saved = saved_tensors(lambda: LeanReLU(inplace=False)(x * 1))
    assert sum(t.untyped_storage().nbytes() for t in saved) == x.numel() // 8
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], g * (x > 0))


@pytest.mark.parametrize(
    "cfg",
    [
        (3, 2, 1, 1, False),
        (2, 2, 0, 1, False),
        (3, 1, 1, 2, True),
        ((3, 2), (2, 1), (1, 0), 1, True),
        (5, 3, 2, 1, True),
    ],
)
def test_lean_maxpool_exact_and_small(cfg):
    k, s, p, d, ceil = cfg
    x = torch.randn(2, 3, 13, 11, requires_grad=True)
    pool = swap_class(nn.MaxPool2d(k, s, p, d, ceil_mode=ceil), LeanMaxPool2d)
    y, saved = saved_tensors(lambda: pool(x))
    assert [t.dtype for t in saved] == [torch.int32] and saved[0].shape == y.shape
    ref = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)(x)
    g = torch.randn_like(ref)
    assert torch.equal(y, ref)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


# --- 8. SWAT-M --------------------------------------------------------------------------------------------------------
def test_momentum_allocation_budget_and_order():
    numel = {"a": 10000, "b": 40000, "c": 1000}
    alloc = momentum_allocation({"a": 0.3, "b": 0.1, "c": 0.05}, numel, 0.1)
    assert abs(sum(alloc.values()) - 0.1 * sum(numel.values())) <= len(numel)
    assert alloc["a"] > alloc["b"] > alloc["c"]
    capped = momentum_allocation({"a": 0.3, "b": 0.01, "c": 5.0}, numel, 0.1)  # c wants far more than it has
    assert capped["c"] == 1000 and abs(sum(capped.values()) - 5100) <= len(numel)


def test_swat_m_controller_reallocates_after_each_step():
    torch.manual_seed(6)
    gm = SWAT(sparsity=0.8, variant="momentum", topk_period=1)(trace(mlp())).gm
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    ctrl = swat_controller(gm).attach(opt)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with torch.no_grad():
        gm.get_submodule("5").weight.mul_(30)  # larger weights -> larger gradients upstream
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    assert ctrl.step == 3 and len(ctrl.history) == 3
    layers = dict(swat_layers(gm))
    numel = {n: m.weight.numel() for n, m in layers.items()}
    kept = sum((1 - m.sparsity) * numel[n] for n, m in layers.items())
    assert abs(kept - 0.2 * sum(numel.values())) <= len(layers) + 1
    assert len({round(m.sparsity, 6) for m in layers.values()}) > 1  # no longer uniform
    ctrl.detach()
    with pytest.raises(PreconditionError, match="momentum"):  # no momentum to allocate from: a typed error
        swat_controller(gm).attach(torch.optim.SGD(gm.parameters(), lr=0.05))


# --- finalize and kernels ---------------------------------------------------------------------------------------------
def test_finalize_gives_plain_hard_pruned_layers_that_export(tmp_path):
    torch.manual_seed(7)
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    gm = SWAT(sparsity=0.9, variant="structured")(trace(net)).gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    F.cross_entropy(gm(x), torch.tensor([1, 2])).backward()
    opt.step()
    result = SWATFinalize()(gm)
    assert result.modified and not list(swat_layers(gm))
    assert type(gm.relu) is nn.ReLU and type(gm.maxpool) is nn.MaxPool2d and type(gm.fc) is nn.Linear
    w = gm.get_submodule("layer1.0.conv1").weight
    assert int((w.abs().sum((2, 3)) != 0).sum()) == math.ceil(0.1 * 64 * 64)
    assert int((gm.fc.weight != 0).sum()) == math.ceil(0.1 * gm.fc.weight.numel())
    assert SWATFinalize()(gm).modified is False
    from sparsifx.backends.onnx_export import export_onnx

    export_onnx(gm.eval(), tmp_path / "swat.onnx", (x,), dynamic_batch=False)


def test_finalize_masked_keeps_dense_weights():
    gm = SWAT(sparsity=0.75)(trace(mlp())).gm
    w = gm.get_submodule("3").weight.detach().clone()
    SWATFinalize(masked=True)(gm)
    layer = gm.get_submodule("3")
    assert torch.equal(layer.weight, w) and int(layer.mask.sum()) == math.ceil(0.25 * w.numel())


@pytest.mark.parametrize("shape", [(1000,), (300, 200), (40000,)])
def test_numpy_and_torch_kernels_agree(shape):
    torch.manual_seed(8)
    x = torch.randn(shape)
    a = x.abs()
    for k in (1, 7, a.numel() // 10, a.numel() - 1):
        ref = float(torch.kthvalue(a.flatten(), a.numel() - k + 1).values)
        assert kernels.NumpyOps.kth_largest(a, k) == ref == kernels.TorchOps.kth_largest(a, k)
    k = a.numel() // 10
    m_np, t_np = kernels.NumpyOps.topk_mask(x, k)
    m_t, t_t = kernels.TorchOps.topk_mask(x, k)
    assert t_np == t_t and torch.equal(m_np, m_t) and int(m_np.sum()) == k
    mask = x > 0.3
    for ops in (kernels.NumpyOps, kernels.TorchOps):
        packed = ops.pack_bits(mask)
        assert packed.numel() == math.ceil(mask.numel() / 8)
        assert torch.equal(packed, kernels.TorchOps.pack_bits(mask))
        assert torch.equal(ops.unpack_bits(packed, mask.shape), mask)
        assert torch.equal(ops.scatter(ops.select(x, mask), mask), x * mask)


def test_docstring_usage_snippet_runs():
    import textwrap

    import sparsifx.passes.training.swat as swat_module

    doc = swat_module.__doc__
    block = doc.split("Usage (``net``, a batch ``x, y``)::\n\n", 1)[1].split("\n\n", 1)[0]
    torch.manual_seed(9)
    scope = {"net": mlp(), "x": torch.randn(16, 1, 8, 8), "y": torch.randint(0, 10, (16,))}
    exec(textwrap.dedent(block), scope)  # noqa: S102 - the documented snippet itself
    assert 0 < scope["kept"] and 0.1 < scope["ratio"] < 1.0
    assert not list(swat_layers(scope["final"])) and scope["gm"].get_submodule("3").sparsity == 0.9


def test_layers_not_called_by_the_graph_are_skipped_and_listed():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mha, self.out = nn.Linear(8, 16), nn.MultiheadAttention(16, 2), nn.Linear(16, 4)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.mha(h, h, h, need_weights=False)[0])

    torch.manual_seed(10)
    gm = SWAT(sparsity=0.5)(trace(Attn())).gm  # MHA is a leaf: its out_proj weight is read directly
    assert gm.meta["swat"]["skipped"] == {"mha.out_proj": "not called as a graph node"}
    assert [n for n, _ in swat_layers(gm)] == ["out"]
    F.mse_loss(gm(torch.randn(3, 5, 8)), torch.zeros(3, 5, 4)).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_threshold_weight_is_exactly_the_abs_ge_mask(dtype):
    """The fused hardshrink form of ``W * (|W| >= thr)`` keeps the same entries, ties at thr included."""
    from sparsifx.passes.training.swat_ops import weight_from_threshold

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(120, 80, generator=g) * 3).round(decimals=1).to(dtype)  # many exact ties
    for thr in [0.1, 1.0, 1.7, float(w.abs().max()), float(w.abs()[w != 0].min()), 0.0, -1.0]:
        expected = torch.where(w.abs() >= torch.tensor(thr, dtype=dtype), w, torch.zeros((), dtype=dtype))
        assert torch.equal(weight_from_threshold(w, thr), expected), thr
    k = 500
    assert topk.abs_kth_largest(w, k) == float(w.abs().flatten().sort(descending=True).values[k - 1])
