"""The issue's target cell (resnet50, 90%, batch 1, one thread) run several times, each in a fresh process.

    python benchmarks/sparse_target_cell.py --runs 3

Each run is ``sparse_end_to_end.py --models resnet50 --sparsities 0.9 --batches 1 --threads 1 --reps 11``: torch
dense, onnxruntime dense, sparsifx lowered and DeepSparse 1.8 interleaved in one process, ratios within the run.
One full table is one sample of a virtual machine whose speed changes from minute to minute; the reruns show the
spread. Writes ``benchmarks/results/sparse_end_to_end_resnet50_b1.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sparse_end_to_end_resnet50_b1"
CELL = ["--models", "resnet50", "--sparsities", "0.9", "--batches", "1", "--threads", "1", "--reps", "11"]
COLUMNS = ("torch_dense", "ort_dense", "lowered", "deepsparse", "lowered_x_ort", "deepsparse_x_ort")


def run_once(folder: Path, i: int) -> dict:
    out = folder / f"run{i}.json"
    script = ROOT / "benchmarks" / "sparse_end_to_end.py"
    subprocess.run([sys.executable, str(script), *CELL, "--out", str(out)], check=True)
    data = json.loads(out.read_text())
    return {"run": i, "cell": data["cells"][0], "meta": data["meta"]}


def markdown(runs: list[dict]) -> str:
    lines = [
        "# resnet50, 90%, batch 1, one thread: the issue's target cell, run several times",
        "",
        f"Command: `python benchmarks/sparse_target_cell.py --runs {len(runs)}` (each run a fresh process: "
        f"`sparse_end_to_end.py {' '.join(CELL)}`), on a quiet machine (no other work).",
        "",
        "The virtual machine alternates between speeds (onnxruntime dense about 90 ms or about 100-107 ms for the "
        "same file); ratios are within one run.",
        "",
        "| run | load before / after | rounds | " + " | ".join(COLUMNS) + " | lowered x DS |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for r in runs:
        c, m = r["cell"], r["meta"]
        values = " | ".join(str(c.get(k, "-")) for k in COLUMNS)
        load = f"{m.get('load_before')} / {m.get('load_after')}"
        lines.append(f"| {r['run']} | {load} | {c.get('rounds')} | {values} | {c.get('lowered_x_deepsparse')} |")
    ratios = [r["cell"]["lowered_x_ort"] for r in runs]
    lines += ["", f"lowered x onnxruntime dense: min {min(ratios)}, max {max(ratios)} over {len(runs)} runs."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(Path(tmp), i) for i in range(1, args.runs + 1)]
    OUT.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    text = markdown(runs)
    OUT.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
