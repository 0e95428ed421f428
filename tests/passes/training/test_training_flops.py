"""Training FLOPs of every sparse-training method on hand-computed cases (issue 15).

One ``Linear(4 -> 3)`` layer, batch N = 5, six optimizer steps (``steps_per_epoch=2, epochs=3``), sparsity 0.5
(6 of 12 weights). Dense forward F = 2·N·n_in·n_out = 120 FLOPs, a dense step 3F = 360, the run 6·3F = 2160.
Per step the algorithm needs forward d·F + input grad d·F + weight grad d_w·F (d_w = 1 on dense-gradient steps);
what this implementation executes for a masked layer is 3F whatever its density.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsifx
from sparsifx import accounting, sparsify
from sparsifx.errors import PreconditionError

N, N_IN, N_OUT, STEPS = 5, 4, 3, 6
F = 2 * N * N_IN * N_OUT  # 120
DENSE_RUN = STEPS * 3 * F  # 2160


def _train(method: str, **params):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_IN, N_OUT))
    stage = {"pass": method, "sparsity": 0.5, **params}
    gm = sparsify(model, {"stages": [stage]}, example_inputs=(torch.randn(N, N_IN),))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    ctrl = sparsifx.attach(gm, opt, steps_per_epoch=2, epochs=3)
    name = ctrl.names[0]
    densities = []
    for _ in range(STEPS):
        densities.append(ctrl.density(name))  # the mask the next forward computes with
        opt.zero_grad()
        gm(torch.randn(N, N_IN)).pow(2).sum().backward()
        opt.step()
    return gm, ctrl, densities


def _dst(method: str, **params):
    return _train(method, distribution="uniform", dense_first_layer=False, init="exact", **params)


def test_static_sparse_everywhere():
    _, ctrl, dens = _dst("static")
    assert dens == [0.5] * STEPS
    f = ctrl.training_flops()
    assert f["training_flops"] == pytest.approx(STEPS * 3 * 0.5 * F)  # 1080
    assert f["executed_training_flops"] == pytest.approx(DENSE_RUN)  # masked layer executes dense
    assert f["dense_training_flops"] == pytest.approx(DENSE_RUN)
    assert f["flops_ratio"] == pytest.approx(0.5) and f["executed_flops_ratio"] == pytest.approx(1.0)


def test_set_constant_density_sparse_gradient():
    _, ctrl, dens = _dst("set", zeta=0.3)
    assert dens == [0.5] * STEPS  # drop k, grow k
    assert ctrl.training_flops()["training_flops"] == pytest.approx(STEPS * 3 * 0.5 * F)


def test_rigl_dense_gradient_on_update_steps_up_to_t_end_inclusive():
    # UpdateSchedule: t counts optimizer steps from 0; updates at t0, t0+ΔT, ... <= T_end (inclusive):
    # delta_t=2, begin 0, end_step=4 over 6 steps -> dense weight gradient on steps {0, 2, 4} exactly
    _, ctrl, dens = _dst("rigl", delta_t=2, end_step=4)
    sched = ctrl.method.schedule(ctrl)
    assert [t for t in range(STEPS) if sched.is_update(t)] == [0, 2, 4]
    assert dens == [0.5] * STEPS
    expected = 3 * (2 * 0.5 + 1.0) * F + 3 * (3 * 0.5) * F  # 720 + 540 = 1260
    f = ctrl.training_flops()
    assert f["training_flops"] == pytest.approx(expected)
    assert f["executed_training_flops"] == pytest.approx(DENSE_RUN)
    # T_end matters: with end_step=2 only steps {0, 2} are dense
    _, ctrl2, _ = _dst("rigl", delta_t=2, end_step=2)
    assert ctrl2.training_flops()["training_flops"] == pytest.approx(2 * 2 * F + 4 * 1.5 * F)


def test_sparse_momentum_dense_weight_gradient_every_step():
    gm, ctrl, dens = _dst("sparse_momentum", prune_rate=0.5)
    expected = sum((2 * d + 1.0) * F for d in dens)
    assert dens[0] == 0.5
    f = ctrl.training_flops()
    assert f["training_flops"] == pytest.approx(expected)
    assert f["training_flops"] >= STEPS * 2 * F - 1e-6  # at least 1/3 of dense always
    # the one-step snapshot would count 3·d·F per step (4x too low at 90% sparsity): it now refuses ...
    with pytest.raises(PreconditionError, match="controller"):
        accounting.training_flops(gm, (torch.randn(N, N_IN),))
    # ... unless the dense gradient is stated: dense_grad_every=1 gives (2d + 1)·F per step
    snap = accounting.training_flops(gm, (torch.randn(N, N_IN),), dense_grad_every=1)
    assert snap.training == pytest.approx((2 * ctrl.density(ctrl.names[0]) + 1.0) * F)


def test_ctre_statistics_charged_per_training_forward():
    _, ctrl, dens = _dst("ctre", zeta=0.2, variant="sim")
    f = ctrl.training_flops()
    stats = STEPS * 2 * N * N_IN * N_OUT  # 2·N·n_in·n_out per forward = 720
    assert f["extra_forward_flops"] == pytest.approx(stats)
    assert f["training_flops"] == pytest.approx(sum(3 * d * F for d in dens) + stats)
    assert f["executed_training_flops"] == pytest.approx(DENSE_RUN + stats)


def test_gmp_integrates_density_over_its_schedule():
    # begin 2, end 4, frequency 1: s_t = 0.5·(1 - (1 - p)^3); after step 2: s=0 (12 kept), after step 3: p=0.5,
    # s=0.4375 -> 12 - round(5.25) = 7 kept, after step 4: s=0.5 -> 6 kept. Forwards of steps 0..5 use
    # densities 1, 1, 1, 1, 7/12, 6/12: the integral, not the final snapshot 0.5.
    _, ctrl, dens = _dst("gmp", begin_step=2, end_step=4, frequency=1)
    assert dens == pytest.approx([1, 1, 1, 1, 7 / 12, 6 / 12])
    f = ctrl.training_flops()
    assert f["training_flops"] == pytest.approx(3 * F * (4 + 7 / 12 + 0.5))  # 1830
    assert f["flops_ratio"] == pytest.approx((4 + 7 / 12 + 0.5) / 6)
    assert f["executed_training_flops"] == pytest.approx(DENSE_RUN)
    with pytest.raises(PreconditionError):
        accounting.training_flops(_dst("gmp", begin_step=2, end_step=4, frequency=1)[0], (torch.randn(N, N_IN),))


def test_swat_measured_densities_and_threshold_reuse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_IN, N_OUT))
    gm = sparsify(
        model,
        {
            "stages": [
                {
                    "pass": "swat",
                    "sparsity": 0.5,
                    "variant": "unstructured",
                    "dense_first_layer": False,
                    "dense_last_layer": False,
                }
            ]
        },
        example_inputs=(torch.randn(N, N_IN),),
    )
    layer = next(m for m in gm.modules() if hasattr(m, "swat"))
    assert layer.sparsity == pytest.approx(0.5)
    meter = accounting.MeasuredFlops(gm)
    gm.train()
    gm(torch.randn(N, N_IN) + 3.0).sum().backward()  # no zeros in x: Top-K keeps 10 of 20 activations, 6 of 12 W
    assert meter.summary()["training_flops"] == pytest.approx(F * (0.5 + 0.5 + 0.5))
    assert meter.summary()["executed_training_flops"] == pytest.approx(3 * F)
    # threshold reuse (stale thresholds): scale W up, and the stored threshold keeps more than 6 weights
    from dataclasses import replace

    layer.swat = replace(layer.swat, every_call=False, period=10, warmup_steps=0)
    with torch.no_grad():
        layer.weight.mul_(4.0)
    gm(torch.randn(N, N_IN) + 3.0).sum().backward()
    dw = meter.mean_densities()
    name = next(iter(dw))
    assert dw[name][0] > 0.5  # measured forward-weight density above nominal
    nominal = accounting.training_flops(gm, (torch.randn(N, N_IN),)).training
    assert meter.summary()["training_flops"] > 2 * nominal * 0.999  # nominal counts 1.5·F per step
    meter.remove()
