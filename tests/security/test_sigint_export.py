"""A real SIGINT at a random moment of export_onnx leaves the old file or a complete verified new one."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

CHILD = textwrap.dedent("""
    import signal, sys, torch
    # a shell that starts the test run in the background (`make test &`) hands SIGINT down ignored; this child
    # stands for an interactive process, so it takes Ctrl-C as Python does by default
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from sparsifx.backends.onnx_export import export_onnx
    path, i = sys.argv[1], 0
    x = torch.ones(2, 4)
    print("ready", flush=True)
    while True:
        i += 1
        model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            model.weight.fill_(i)
            model.bias.zero_()
        export_onnx(model, path, (x,))
""")


@pytest.mark.parametrize("trial", range(4))
def test_sigint_leaves_old_or_complete_new_file(trial, tmp_path):
    target = tmp_path / "model.onnx"
    old = b"previous good file"
    target.write_bytes(old)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(random.Random(trial).uniform(0.0, 2.0))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    data = target.read_bytes()
    if data != old:  # a new file: complete, valid, and what the model computes (weights all equal to i)
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        y = sess.run(None, {sess.get_inputs()[0].name: np.ones((2, 4), np.float32)})[0]
        assert y.shape == (2, 3) and np.all(y == y.flat[0]) and y.flat[0] % 4 == 0 and y.flat[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left behind


def test_an_interrupt_wrapped_by_an_exporter_is_not_swallowed_by_the_fallback(tmp_path, monkeypatch):
    """Native passes can re-raise a Ctrl-C inside a Python callback as a RuntimeError: export must stop, not try
    the next exporter (which would let a loop of exports ignore SIGINT)."""
    import torch

    from sparsifx.backends import onnx_export

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("pass failed") from exc

    calls = []
    assert onnx_export.AUTO_ORDER[0] == "torchscript"
    monkeypatch.setattr(
        onnx_export.EXPORTERS, "get", lambda name: interrupted if name == "torchscript" else calls.append(name)
    )
    old = b"previous"
    (tmp_path / "m.onnx").write_bytes(old)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(torch.nn.Linear(4, 3), tmp_path / "m.onnx", (torch.ones(2, 4),), exporter="auto")
    assert calls == [] and (tmp_path / "m.onnx").read_bytes() == old
