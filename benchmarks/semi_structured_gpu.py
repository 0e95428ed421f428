"""GPU benchmark: 2:4 semi-structured Linear (``torch.sparse.to_sparse_semi_structured``) vs dense, fp16/bf16.

    python benchmarks/semi_structured_gpu.py --out benchmarks/results/semi_structured_gpu.json

Needs a CUDA device with sparse tensor cores (Ampere or newer). For each Linear shape and dtype it builds a
2:4 mask with the ``nm`` pass's ``nm_mask``, checks the sparse result against the dense masked one, and times
dense ``F.linear`` and the semi-structured layer as medians of interleaved runs (CUDA events, synchronised).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import harness  # noqa: E402

SHAPES = [  # (batch tokens, in_features, out_features)
    (64, 4096, 4096),
    (2048, 4096, 4096),
    (8192, 4096, 4096),
    (2048, 4096, 11008),
    (2048, 11008, 4096),
    (8192, 8192, 8192),
]


def time_gpu(fns: dict, reps: int) -> dict[str, float]:
    """Median ms per call of each fn: 3 warm-up calls each, then ``reps`` interleaved rounds on CUDA events."""
    for f in fns.values():
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    return harness.medians_ms(harness.interleaved_samples(fns, reps, clocks=("cuda",), seed=None)["cuda"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/semi_structured_gpu.json")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    from torch.sparse import to_sparse_semi_structured

    from sparsifx.passes.nm import is_nm, nm_mask

    meta = harness.machine(clock="cuda")
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for tokens, k, n in SHAPES:
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            w = w * nm_mask(w, 2, 4)
            assert is_nm(w, 2, 4)
            ws = to_sparse_semi_structured(w)
            x = torch.randn(tokens, k, device="cuda", dtype=dtype)
            with torch.inference_mode():
                torch.testing.assert_close(F.linear(x, ws), F.linear(x, w), rtol=2e-2, atol=2e-1)
                t = time_gpu({"dense": lambda: F.linear(x, w), "2:4": lambda: F.linear(x, ws)}, args.reps)
            rows.append(
                dict(
                    dtype=str(dtype).replace("torch.", ""),
                    tokens=tokens,
                    in_features=k,
                    out_features=n,
                    dense_ms=round(t["dense"], 4),
                    semi_ms=round(t["2:4"], 4),
                    speedup=round(t["dense"] / t["2:4"], 3),
                )
            )
            print(rows[-1], flush=True)
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "reps": args.reps,
        "rows": rows,
        "meta": harness.finish(meta),
    }
    lines = [
        f"# 2:4 semi-structured vs dense Linear on {res['device']} (torch {res['torch']})",
        "",
        f"Median ms of {args.reps} interleaved runs (CUDA events). {harness.load_line(meta)}",
        "",
        "| dtype | tokens | in | out | dense ms | 2:4 ms | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dtype']} | {r['tokens']} | {r['in_features']} | {r['out_features']} | {r['dense_ms']} | "
        f"{r['semi_ms']} | {r['speedup']} |"
        for r in rows
    ]
    harness.write_results(Path(args.out), res, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
