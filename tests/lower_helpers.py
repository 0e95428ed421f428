"""Shared by the tests of ``lower``'s whole-model and micro-batch steps: a pruned model and a fake timer."""

import torch

import sparsifx
from sparsifx.testing import randomize_constants


def masked(model: torch.nn.Module, x: torch.Tensor):
    """``(model pruned to 80% by magnitude with BatchNorm folded, x)``; constants re-randomised first."""
    torch.manual_seed(0)
    model = randomize_constants(model)[0].eval()
    stages = [{"pass": "magnitude", "sparsity": 0.8}, {"pass": "fold_bn"}]
    return sparsifx.sparsify(model, {"stages": stages}, example_inputs=(x,)).eval(), x


def fake_timer(winner: str):
    """A ``median_ms`` that runs each candidate once and says ``winner`` took 1 ms, the others 2 ms."""

    def median_ms(fns, reps=7, **_):
        for f in fns.values():
            f()
        return {k: 1.0 if k == winner else 2.0 for k in fns}

    return median_ms
