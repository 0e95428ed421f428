"""``storage: sparse``: SparseLinear equals the masked dense reference, topology updates keep nnz and move the
optimizer state, and training with sparse storage follows training with masks step for step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sparsifx
from sparsifx.errors import PassError, PreconditionError, RecipeError
from sparsifx.passes.training import mask_ops, sparse_updates
from sparsifx.sparse_linear import SparseLinear


def _layer(out_f: int, in_f: int, density: float, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        lin.bias.copy_(torch.randn(out_f, generator=g))
    numel = out_f * in_f
    k = max(1, round(density * numel))
    keys = torch.randperm(numel, generator=g)[:k].sort().values
    mask = torch.zeros(numel, dtype=dtype)
    mask[keys] = 1
    return lin, SparseLinear.from_dense(lin, keys), mask.view(out_f, in_f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,density,batch",
    [
        ((1, 1), 1.0, 1),
        ((7, 13), 0.5, 33),
        ((64, 300), 0.9, 512),
        ((300, 64), 0.99, 1),
        ((256, 512), 0.999, 100),
        ((128, 128), 0.5, 512),
        ((33, 1000), 0.95, 7),
    ],
)
def test_forward_and_gradients_equal_the_masked_dense_reference(shape, density, batch, dtype):
    out_f, in_f = shape
    lin, sparse, mask = _layer(out_f, in_f, 1.0 - density if density < 1 else 1.0, dtype)
    x = torch.randn(batch, in_f, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = (lin.weight.detach().float() * mask.float()).requires_grad_(True)
    y = sparse(x)
    y_ref = F.linear(x_ref.float(), w_ref, lin.bias.detach().float())
    g = torch.randn(batch, out_f)
    y.backward(g.to(dtype))
    y_ref.backward(g)
    # fp32: reductions over up to 512 rows in another order; bf16: values and products rounded to 8 bits
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2 * max(1.0, in_f**0.5)}
    assert y.dtype == dtype and sparse.values.grad.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), **tol)
    keys = sparse.keys()
    torch.testing.assert_close(sparse.values.grad.float(), w_ref.grad.flatten()[keys], **tol)
    torch.testing.assert_close(sparse.bias.grad.float(), g.sum(0), **tol)


def test_a_normal_step_creates_no_tensor_of_the_dense_weight_size():
    out_f, in_f, batch = 512, 512, 8
    _, sparse, _ = _layer(out_f, in_f, 0.02)
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    sizes.append((t.numel(), str(func)))
            return out

    x = torch.randn(batch, in_f, requires_grad=True)
    with Sizes():
        sparse(x).square().sum().backward()
    assert max(n for n, _ in sizes) < out_f * in_f // 4, sorted(sizes)[-3:]


def _train(storage: str, method: str, steps: int = 20, optimizer: str = "sgd", **params):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    model = sparsifx.sparsify(net, {"stages": [{"pass": method, "storage": storage, "seed": 3, **params}]})
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    ctrl = sparsifx.attach(model, opt, steps_per_epoch=5, epochs=4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(100, 20, generator=g), torch.randint(0, 5, (100,), generator=g)
    losses = []
    for t in range(steps):
        batch = slice((t % 5) * 20, (t % 5) * 20 + 20)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, ctrl, model


@pytest.mark.parametrize(
    "method,params",
    [("static", {}), ("set", {}), ("set", {"grow_init": "normal"}), ("gmp", {"sparsity": 0.8, "frequency": 2})],
)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparse_storage_trains_like_masked_storage_from_the_same_seed(method, params, optimizer):
    masked, ctrl_m, _ = _train("masked", method, optimizer=optimizer, **params)
    sparse, ctrl_s, model = _train("sparse", method, optimizer=optimizer, **params)
    torch.testing.assert_close(torch.tensor(sparse), torch.tensor(masked), rtol=1e-5, atol=1e-5)
    assert ctrl_s.nnz() == ctrl_m.nnz()
    assert all(isinstance(m, SparseLinear) for m in ctrl_s.layers.values())
    tol = 1e-6 if optimizer == "sgd" else 1e-4  # Adam divides by sqrt(v): tiny v amplify rounding
    for name, layer in ctrl_s.layers.items():
        torch.testing.assert_close(
            layer.to_dense_weight(), ctrl_m.layers[name].effective_weight().detach(), rtol=1e-5, atol=tol
        )
    if method != "static":
        assert ctrl_s.history, "no topology update ran"


@pytest.mark.parametrize("method,params", [("set", {}), ("rigl", {"delta_t": 3, "sparsity": 0.9})])
def test_nnz_is_constant_across_topology_updates(method, params):
    _, ctrl, _ = _train("sparse", method, **params)
    records = [h for h in ctrl.history if h["kind"] == method]
    assert records and any(h["grown"] > 0 for h in records)
    first = {}
    for h in records:
        first.setdefault(h["layer"], h["nnz"])
        assert h["nnz"] == first[h["layer"]]


def test_rigl_sparse_grows_where_the_dense_gradient_is_largest_in_bounded_blocks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(30, 40))
    model = sparsifx.sparsify(
        net,
        {
            "stages": [
                {
                    "pass": "rigl",
                    "storage": "sparse",
                    "sparsity": 0.9,
                    "distribution": "uniform",
                    "dense_first_layer": False,
                    "delta_t": 1,
                    "drop_fraction": 0.5,
                    "anneal": "constant",
                    "end_step": 5,
                }
            ]
        },
    )
    layer = model.get_submodule("0")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sparsifx.attach(model, opt)
    x = torch.randn(16, 30)
    w_before, keys_before = layer.to_dense_weight().clone(), layer.keys().clone()
    out = model(x)
    out.square().sum().backward()
    dense_grad = (2 * out.detach()).t() @ x  # dL/dW of sum(y^2)
    blocks = list(layer.dense_grad_blocks(max_bytes=4 * 30 * 7))  # 7 rows per block
    assert len(blocks) == 6 and max(b.shape[0] for _, b in blocks) == 7
    torch.testing.assert_close(torch.cat([b for _, b in blocks]), dense_grad)
    values_before = layer.values.detach().clone()
    opt.step()
    n_drop = keys_before.numel() // 2
    kept = keys_before[torch.topk(values_before.abs(), keys_before.numel() - n_drop).indices].sort().values
    score = dense_grad.abs().flatten()
    score[kept] = -1
    expect = torch.topk(score, n_drop).indices
    assert layer.nnz == keys_before.numel()
    assert torch.equal(layer.keys(), torch.cat([kept, expect]).sort().values)
    assert torch.equal(layer.to_dense_weight().flatten()[kept], w_before.flatten()[kept])


def test_optimizer_slots_follow_the_weights_through_a_set_update():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    model = sparsifx.sparsify(
        net, {"stages": [{"pass": "set", "storage": "sparse", "evolve_last": True, "epsilon": 2}]}
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctrl = sparsifx.attach(model, opt, steps_per_epoch=2, epochs=3)
    layer = model.get_submodule("0")
    x = torch.randn(8, 10)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    keys, slots = layer.keys().clone(), opt.state[layer.values]["momentum_buffer"].clone()
    model(x).sum().backward()
    slots = slots * 0.9 + layer.values.grad  # the momentum this step will have before the epoch-end update
    decided = {}
    replace = ctrl.replace_topology

    def spy(name, keep, grown, **kw):
        decided.setdefault(name, keep.clone())
        return replace(name, keep, grown, **kw)

    ctrl.replace_topology = spy
    opt.step()  # epoch end: SET evolves
    assert "0" in decided and any(h["kind"] == "set" and h["layer"] == "0" for h in ctrl.history)
    new_keys, new_slots = layer.keys(), opt.state[layer.values]["momentum_buffer"]
    assert new_slots.shape == layer.values.shape
    kept_before = decided["0"]
    kept_after = torch.isin(new_keys, keys[kept_before])
    torch.testing.assert_close(new_slots[kept_after], slots[kept_before])
    assert torch.count_nonzero(new_slots[~kept_after]) == 0


def test_random_keys_are_unique_sorted_and_avoid_the_excluded():
    g = torch.Generator().manual_seed(0)
    excluded = torch.arange(0, 1000, 3)
    keys = mask_ops.random_keys(1000, 500, g, excluded=excluded)
    assert keys.numel() == 500 and torch.equal(keys, torch.unique(keys))
    assert not torch.isin(keys, excluded).any()
    assert mask_ops.random_keys(10, 50, g).numel() == 10


def test_large_layers_draw_and_evolve_by_index_sampling(monkeypatch):
    from sparsifx.passes.training import dst_base

    monkeypatch.setattr(dst_base, "DENSE_DRAW_LIMIT", 100)
    monkeypatch.setattr(sparse_updates, "DENSE_DRAW_LIMIT", 100)
    monkeypatch.setattr(mask_ops, "random_mask", lambda *a, **k: pytest.fail("dense mask drawn"))
    losses, ctrl, _ = _train("sparse", "set", steps=12)
    assert all(loss == loss for loss in losses) and any(h["kind"] == "set" for h in ctrl.history)
    density = {n: ctrl.density(n) for n in ctrl.names}
    assert all(0 < d < 1 for d in density.values())


def test_executed_flops_are_dense_for_masked_and_proportional_to_nnz_for_sparse():
    _, masked, _ = _train("masked", "static", steps=3, sparsity=0.9)
    _, sparse, _ = _train("sparse", "static", steps=3, sparsity=0.9)
    fm, fs = masked.training_flops(), sparse.training_flops()
    assert fm["executed_flops_ratio"] == pytest.approx(1.0)
    assert fs["executed_flops_ratio"] == pytest.approx(fs["flops_ratio"])
    assert fs["executed_flops_ratio"] < 0.2
    bm, bs = masked.state_bytes(), sparse.state_bytes()
    assert bs["parameters"] < bm["parameters"] / 3 and bs["optimizer_state"] < bm["optimizer_state"] / 3


def test_save_load_export_and_compact_work_on_a_sparse_storage_model(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    model = sparsifx.sparsify(
        net,
        {
            "stages": [
                {
                    "pass": "static",
                    "storage": "sparse",
                    "sparsity": 0.97,
                    "distribution": "uniform",
                    "dense_first_layer": False,
                }
            ]
        },
    )
    x = torch.randn(4, 20)
    ref = model(x)
    sparsifx.save(model, tmp_path / "m.sfx")
    loaded = sparsifx.load(tmp_path / "m.sfx")
    assert isinstance(loaded.get_submodule("0"), SparseLinear)
    torch.testing.assert_close(loaded(x), ref)
    for sparse_weights in (False, True):
        sparsifx.export_onnx(model, tmp_path / f"m{sparse_weights}.onnx", x, sparse_weights=sparse_weights)
    assert isinstance(model.get_submodule("0"), SparseLinear)  # export worked on a copy
    compact = sparsifx.sparsify(model, {"stages": [{"pass": "compact"}]}, example_inputs=(x,))
    assert compact.get_submodule("0").out_features < 64 and isinstance(compact.get_submodule("0"), SparseLinear)
    torch.testing.assert_close(compact(x), ref)


def test_corrupted_indices_from_a_file_are_a_typed_error():
    _, layer, _ = _layer(8, 6, 0.5)
    layer.col[0] = 1000
    with pytest.raises(PassError, match="invalid sparse structure"):
        layer(torch.randn(2, 6))


@pytest.mark.parametrize("method", ["ctre", "sparse_momentum", "swat"])
def test_methods_that_need_dense_state_refuse_sparse_storage(method):
    with pytest.raises(RecipeError, match="storage: sparse"):
        sparsifx.sparsify(nn.Sequential(nn.Linear(3, 4)), {"stages": [{"pass": method, "storage": "sparse"}]})
    with pytest.raises(RecipeError, match="storage"):
        sparsifx.sparsify(nn.Sequential(nn.Linear(3, 4)), {"stages": [{"pass": "set", "storage": "csr"}]})


def test_conv_layers_stay_masked_with_a_note():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model = sparsifx.sparsify(net, {"stages": [{"pass": "static", "storage": "sparse", "sparsity": 0.8}]})
    assert isinstance(model.get_submodule("2"), SparseLinear)
    assert "0" in model.meta["storage_notes"]
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def test_a_1x1_conv_trains_in_sparse_storage_like_its_masked_twin(tmp_path):
    losses, models = {}, {}
    for storage in ("masked", "sparse"):
        model = sparsifx.sparsify(_conv_net(), {"stages": [{"pass": "set", "storage": storage, "epsilon": 3}]})
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sparsifx.attach(model, opt, steps_per_epoch=3, epochs=3)
        g = torch.Generator().manual_seed(0)
        losses[storage] = []
        for _ in range(9):
            loss = model(torch.randn(4, 3, 10, 10, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[storage].append(loss.item())
        models[storage] = model
    from sparsifx.sparse_linear import SparseConv2d1x1

    assert isinstance(models["sparse"].get_submodule("2"), SparseConv2d1x1)
    torch.testing.assert_close(torch.tensor(losses["sparse"]), torch.tensor(losses["masked"]))
    x = torch.randn(2, 3, 10, 10)
    sparsifx.export_onnx(models["sparse"], tmp_path / "c.onnx", x)
    sparsifx.save(models["sparse"], tmp_path / "c.sfx")
    torch.testing.assert_close(sparsifx.load(tmp_path / "c.sfx")(x), models["sparse"](x))


def test_ddp_refuses_a_method_that_resizes_sparse_storage(monkeypatch):
    model = sparsifx.sparsify(nn.Sequential(nn.Linear(3, 4)), {"stages": [{"pass": "gmp", "storage": "sparse"}]})
    fake = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(fake)
    fake.module = model
    with pytest.raises(PreconditionError, match="DistributedDataParallel"):
        sparsifx.attach(fake, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=2, epochs=2)


def test_report_counts_sparse_layers_as_their_dense_twin_and_notes_executed_flops():
    _, ctrl, model = _train("sparse", "static", steps=2, sparsity=0.9)
    rep = sparsifx.report(model, (torch.randn(4, 20),))
    row = rep.layer("2")
    assert row.params == 64 * 64 + 64 and row.nonzeros < row.params / 5
    assert row.sparse_macs < row.macs / 5
    text = str(rep)
    assert "executed FLOPs" in text and "theoretical" in text and "optimizer_state" in text


def test_layers_built_on_the_meta_device_start_in_sparse_storage_without_a_dense_weight():
    with torch.device("meta"):
        body = [nn.Linear(50, 3000), nn.ReLU(), nn.Linear(3000, 3000), nn.ReLU()]
    net = nn.Sequential(*body, nn.Linear(3000, 2))
    model = sparsifx.sparsify(
        net,
        {
            "stages": [
                {
                    "pass": "set",
                    "storage": "sparse",
                    "distribution": "er_epsilon",
                    "epsilon": 5,
                    "dense_last_layer": True,
                }
            ]
        },
    )
    hidden = model.get_submodule("2")
    assert isinstance(hidden, SparseLinear) and not hidden.values.is_meta
    assert hidden.nnz == pytest.approx(5 * 6000, rel=0.05)
    out = model(torch.randn(8, 50))
    assert out.shape == (8, 2) and out.abs().mean() > 1e-3  # He init over the real fan-in keeps a signal
    with torch.device("meta"):
        dense_meta = nn.Sequential(nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 2))
    with pytest.raises(PassError, match="meta device"):
        sparsifx.sparsify(dense_meta, {"stages": [{"pass": "set", "storage": "masked", "epsilon": 2}]})


def test_a_plain_loop_with_a_closure_gives_rigl_this_steps_gradients():
    torch.manual_seed(0)
    model = sparsifx.sparsify(
        nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)),
        {"stages": [{"pass": "rigl", "sparsity": 0.8, "delta_t": 1, "end_step": 3, "storage": "sparse"}]},
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = sparsifx.attach(model, opt)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and any(h["kind"] == "rigl" for h in ctrl.history)
    with pytest.raises(PreconditionError, match="LBFGS"):
        sparsifx.attach(model, torch.optim.LBFGS(model.parameters()))


def test_a_model_already_in_sparse_storage_is_sparse_trained_with_its_topology():
    torch.manual_seed(0)
    lin = nn.Linear(30, 40)
    keys = torch.randperm(1200)[:120].sort().values
    net = nn.Sequential(SparseLinear.from_dense(lin, keys), nn.ReLU(), nn.Linear(40, 3))
    model = sparsifx.sparsify(net, {"stages": [{"pass": "set", "storage": "sparse", "epsilon": 3}]})
    ctrl = model.meta["sparse_controller"]
    assert "0" in ctrl.names and torch.equal(model.get_submodule("0").keys(), keys)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifx.attach(model, opt, steps_per_epoch=1, epochs=2)
    model(torch.randn(4, 30)).sum().backward()
    opt.step()
    assert model.get_submodule("0").nnz == 120 and any(h["layer"] == "0" for h in ctrl.history)
