"""A DST-trained model bakes and exports like any other: ONNX checked and verified with onnxruntime."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.masking import bake_masks, masked_layers


@pytest.mark.parametrize("method,params", [("rigl", {"delta_t": 2, "end_step": 6}), ("set", {"epsilon": 10})])
def test_dst_trained_model_bakes_and_exports(method, params, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    gm = sparsifx.sparsify(net, {"stages": [{"pass": method, "sparsity": 0.9, **params}]})
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=4, epochs=3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(12):  # the whole declared run: 3 epochs of 4 steps
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    assert ctrl.history  # the masks really moved during training
    masks = ctrl.masks()
    gm.eval()
    expected = gm(x)

    baked = copy.deepcopy(gm)
    assert bake_masks(baked) == len(masks)
    baked.graph.lint()
    assert not list(masked_layers(baked))
    torch.testing.assert_close(baked(x), expected)
    for name, mask in masks.items():
        w = baked.get_submodule(name).weight
        assert torch.equal(w != 0, mask.bool() & (w != 0)) and int((w != 0).sum()) <= int(mask.sum())

    path = sparsifx.export_onnx(gm, tmp_path / f"{method}.onnx", (x,))
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), expected.detach(), rtol=1e-4, atol=1e-4)
    assert list(masked_layers(gm))  # export did not bake the live model

    # after the declared run the module hooks are gone, so the trained model saves as plain data
    assert not any(m._forward_hooks for m in gm.modules())
    sparsifx.save(gm, tmp_path / f"{method}.sfx")
    loaded = sparsifx.load(tmp_path / f"{method}.sfx")
    torch.testing.assert_close(loaded.eval()(x), expected)
