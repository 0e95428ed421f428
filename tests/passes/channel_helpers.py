"""Shared checks for the channel-pruning tests: prune -> masked reference -> shrink -> compare."""
from __future__ import annotations

import torch

from sparsifx.pass_manager import run_model
from sparsifx.passes.channels import ChannelPrune, Shrink
from sparsifx.tracing import record_shapes, trace


def _shapes(meta):
    if meta is None or hasattr(meta, "shape"):
        return None if meta is None else tuple(meta.shape)
    return tuple(_shapes(m) for m in meta) if isinstance(meta, (tuple, list)) else None


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_and_shrink(model: torch.nn.Module, inputs: tuple, ratio: float = 0.5, expect_smaller: bool = True,
                     **prune_kwargs):
    """Trace, prune, shrink; assert modified flags, lint, shrunk == masked and (optionally) fewer params."""
    torch.manual_seed(0)
    gm = trace(model.eval(), inputs)
    gm.meta["example_inputs"] = inputs
    before = n_params(gm)
    dense = run_model(gm, inputs)
    result = ChannelPrune(ratio=ratio, **prune_kwargs)(gm)
    assert result.modified is expect_smaller
    masked = run_model(gm, inputs)
    if expect_smaller:
        assert not torch.equal(masked, dense) if isinstance(dense, torch.Tensor) else True
    shrunk = Shrink()(gm)
    assert shrunk.modified is expect_smaller
    gm.graph.lint()
    out = run_model(gm, inputs)
    scale = max(1.0, float(masked.abs().max())) if isinstance(masked, torch.Tensor) else 1.0
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5 * scale)
    after = n_params(gm)
    assert (after < before) if expect_smaller else (after == before)
    updated = {n.name: _shapes(n.meta.get("tensor_meta")) for n in gm.graph.nodes}
    record_shapes(gm, inputs)  # shrink updated the shapes from the plan: they match a real run
    assert updated == {n.name: _shapes(n.meta.get("tensor_meta")) for n in gm.graph.nodes}
    return gm, masked, out
