"""Helpers to test graph passes the way sparsifx tests its own: for authors of custom passes.

* ``assert_equivalent(model_a, model_b, inputs)``: both models give the same outputs (``torch.testing.assert_close``),
  after the constants that would hide a wrong transformation (BatchNorm running statistics at 0 and 1, norm
  scales at 1 and shifts at 0, layer scales all one value) are re-randomised, identically in both.
* ``eval_mode(*modules)``: eval mode inside a ``with`` block, every submodule's own flag restored afterwards.
* ``prune_and_shrink(model, example_inputs, ratio, **channel_prune_params)``: trace -> ``channel_prune`` ->
  ``shrink`` with the checks every channel rule must pass (shrunk == masked, fewer parameters, lint, shapes).

Example::

    from sparsifx.testing import assert_equivalent

    def test_my_pass_keeps_outputs():
        model = Net()
        gm = sparsifx.trace(model, (x,))
        assert_equivalent(model, MyPass()(gm).gm, (x,))
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch
import torch.nn as nn

from .meta_keys import EXAMPLE_INPUTS, TENSOR_META
from .module_utils import eval_mode

__all__ = ["assert_equivalent", "eval_mode", "n_params", "prune_and_shrink", "randomize_constants"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def n_params(module: nn.Module) -> int:
    """The number of parameter elements (shared parameters counted once each time they appear, as
    ``module.parameters()`` lists them: once)."""
    return sum(p.numel() for p in module.parameters())


def _constants(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: tensor}`` of the constants ``randomize_constants`` re-draws (see there)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, m in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(m, _NORM_TYPES):
            for key in ("running_mean", "running_var", "weight", "bias"):
                t = getattr(m, key, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    out[dot + key] = t
            continue
        for key, p in m.named_parameters(recurse=False):
            if (
                key != "bias"
                and p.is_floating_point()
                and p.numel() > 1
                and p.numel() == max(p.shape, default=1)
                and bool((p == p.reshape(-1)[0]).all())
            ):
                out[dot + key] = p  # a layer scale / gain vector initialised to one value
    return out


def _draw(name: str, t: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    u = torch.rand(t.shape, generator=gen, dtype=torch.float64)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        values = 0.5 + 1.5 * u  # U(0.5, 2)
    elif leaf in ("running_mean", "bias"):
        values = u - 0.5  # U(-0.5, 0.5)
    else:
        values = 0.5 + u  # scales: U(0.5, 1.5)
    return values.to(dtype=t.dtype, device=t.device)


@torch.no_grad()
def randomize_constants(*modules: nn.Module, seed: int = 0) -> tuple[nn.Module, ...]:
    """Re-draw, in place and identically in every module, the values that are constants after a fresh
    initialisation and so hide a mis-sliced or mis-folded tensor: the running statistics and affine parameters
    of BatchNorm / InstanceNorm / LayerNorm / GroupNorm layers, and parameter vectors (not biases) holding one value
    (layer scales, gains). A tensor is re-drawn when every module has it under the same qualified name with the
    same shape; its values depend only on that name and ``seed``. Returns the modules."""
    tables = [_constants(m) for m in modules]
    if not tables:
        return modules
    for name, t in tables[0].items():
        others = [tab.get(name) for tab in tables[1:]]
        if any(o is None or o.shape != t.shape for o in others):
            continue
        values = _draw(name, t, seed)
        for tensor in [t, *others]:
            tensor.copy_(values)
    return modules


def assert_equivalent(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Sequence[Any],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    rerandomize: bool = True,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Assert that ``model_a(*inputs)`` and ``model_b(*inputs)`` agree (``torch.testing.assert_close`` on the
    whole output structure), both run in eval mode under ``no_grad`` (their own training flags restored
    afterwards). With ``rerandomize`` (default), first ``randomize_constants(model_a, model_b, seed=seed)``:
    fresh BatchNorm statistics (mean 0, variance 1) and unit norm scales would let a wrongly sliced, folded or
    reordered channel pass unnoticed. Note it changes both models in place. Returns both outputs."""
    inputs = tuple(inputs)
    if rerandomize:
        randomize_constants(model_a, model_b, seed=seed)
    with eval_mode(model_a, model_b), torch.no_grad():
        expected = model_a(*inputs)
        actual = model_b(*inputs)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    return expected, actual


def _shapes(meta):
    if meta is None or hasattr(meta, "shape"):
        return None if meta is None else tuple(meta.shape)
    return tuple(_shapes(m) for m in meta) if isinstance(meta, (tuple, list)) else None


def prune_and_shrink(
    model: nn.Module, example_inputs: tuple, ratio: float = 0.5, expect_smaller: bool = True, **channel_prune_params
):
    """Trace, ``channel_prune(ratio, **channel_prune_params)``, ``shrink``, checking on the way: both passes
    report ``modified`` (or, with ``expect_smaller=False``, neither does), the masked model's outputs differ from
    the dense one's, the graph lints, shrunk == masked (``assert_close``, rtol 1e-4, atol 1e-5 x the output
    magnitude), fewer parameters (or as many), and the shapes that shrink recorded match a real run.
    ``model`` is put in eval mode. Returns ``(shrunk GraphModule, masked outputs, shrunk outputs)``."""
    from .pass_manager import run_model
    from .passes.channels import ChannelPrune, Shrink
    from .tracing import record_shapes, trace

    torch.manual_seed(0)
    gm = trace(model.eval(), example_inputs)
    gm.meta[EXAMPLE_INPUTS] = example_inputs
    before = n_params(gm)
    dense = run_model(gm, example_inputs)
    result = ChannelPrune(ratio=ratio, **channel_prune_params)(gm)
    assert result.modified is expect_smaller
    masked = run_model(gm, example_inputs)
    if expect_smaller:
        assert not torch.equal(masked, dense) if isinstance(dense, torch.Tensor) else True
    shrunk = Shrink()(gm)
    assert shrunk.modified is expect_smaller
    gm.graph.lint()
    out = run_model(gm, example_inputs)
    scale = max(1.0, float(masked.abs().max())) if isinstance(masked, torch.Tensor) else 1.0
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5 * scale)
    after = n_params(gm)
    assert (after < before) if expect_smaller else (after == before)
    updated = {n.name: _shapes(n.meta.get(TENSOR_META)) for n in gm.graph.nodes}
    record_shapes(gm, example_inputs)  # shrink updated the shapes from the plan: they match a real run
    assert updated == {n.name: _shapes(n.meta.get(TENSOR_META)) for n in gm.graph.nodes}
    return gm, masked, out
