"""Under DistributedDataParallel (2 gloo processes on CPU) every rank holds identical masks after every update."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("dst_ddp_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo missing")
def test_masks_identical_across_ranks_and_training_continues(tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {
        "rigl",
        "set",
        "sparse_momentum",
        "ctre",
        "gmp",
        "static",
        "rigl@sparse",
        "set@sparse",
        "static@sparse",
    }
    for method, r in results.items():
        assert all(r["equal"]), f"{method}: masks/weights differ across ranks at steps {r['equal']}"
        assert all(math.isfinite(v) for v in r["losses"]), method
        assert r["weights_moved"], method
        if not method.startswith("static"):
            assert r["updates"] >= 3 and r["changed"] > 0, (method, r["updates"], r["changed"])
