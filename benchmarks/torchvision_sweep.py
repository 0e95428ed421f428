"""Channel-pruning sweep over every torchvision classification model (optionally against Torch-Pruning).

    python benchmarks/torchvision_sweep.py --models all --ratio 0.5 \
        --out benchmarks/results/torchvision_sweep.json [--compare torch-pruning] [--round-to 16]

Per model (random weights, BatchNorm calibrated, eval, batch 1; sides in ``prune_sweep_worker.spec``):
trace -> ``channel_prune`` 50 %, kept channels rounded up to ``--round-to`` -> ``shrink`` (timed), shrunk ==
masked (``assert_close``), params and MACs before/after (aten-level FLOP counter), compact ONNX (``fold_bn``
then ``export_onnx`` with onnxruntime verification), peak RSS, and steady-state median latencies of
interleaved rounds (``harness.interleaved_ms``): eager dense vs shrunk
(2 threads, wall clock), onnxruntime dense vs compact (1 thread, that thread's CPU clock), and for the
physical-limit models the shrunk model vs a
freshly allocated dense model of the same shapes. With ``--compare torch-pruning`` Torch-Pruning 1.6
(benchmark-only dependency: ``pip install -e .[compare]``) prunes the same model right after, in its
own subprocess. Each (model, tool) runs in a forked subprocess with a time limit and an RSS cap, so a crash,
hang or memory blow-up is recorded as that model's failure with its cause. Results are written after
every model (JSON + a markdown table with the same basename); ``--resume`` skips finished models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(HERE.parent)
from benchmarks import harness  # noqa: E402


def all_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


HEAVY_PARAMS = 100_000_000


def num_params(name: str) -> int:
    """Parameter count from torchvision's weight metadata (no model is built); 0 when unknown."""
    import torchvision

    try:
        return max(w.meta.get("num_params", 0) for w in torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        return 0


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _child(conn, name: str, tool: str, ratio: float, round_to: int, mode: str, latency: bool) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(2)
    from benchmarks import prune_sweep_worker as w

    kwargs = {"measure": latency} if tool == "sparsifx" else {}
    conn.send(w.TOOLS[tool](name, ratio=ratio, round_to=round_to, mode=mode, **kwargs))
    conn.close()


def preload(tools: list[str]) -> None:
    """Import the heavy modules once; every model runs in a forked child that inherits them."""
    import onnxruntime  # noqa: F401
    import torchvision  # noqa: F401

    import sparsifx  # noqa: F401
    from benchmarks import prune_sweep_worker  # noqa: F401

    if "torch-pruning" in tools:
        import torch_pruning  # noqa: F401


def run_isolated(name: str, tool: str, args: argparse.Namespace) -> dict:
    """One (model, tool) in a forked child with a time limit and an RSS cap; failures get a cause."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(
        target=_child, args=(send, name, tool, args.ratio, args.round_to, args.mode, not args.no_latency)
    )
    proc.start()
    send.close()
    peak, killed, result = 0.0, None, None
    while result is None:
        if recv.poll(0.2):
            try:
                result = recv.recv()
            except EOFError:  # the child died without sending
                break
            continue
        if not proc.is_alive():
            break
        rss = _rss_mb(proc.pid)
        peak = max(peak, rss)
        if rss > args.max_rss_gb * 1024:
            killed = f"memory: RSS {rss / 1024:.1f} GB over the {args.max_rss_gb} GB cap (killed)"
        elif time.perf_counter() - t0 > args.timeout:
            killed = f"timeout: still running after {args.timeout:.0f} s (killed)"
        if killed:
            proc.kill()
            break
    proc.join()
    wall = round(time.perf_counter() - t0, 1)
    if result is not None:
        result.update(wall_s=wall, watched_peak_rss_mb=round(peak))
        return result
    cause = killed or f"crash: the subprocess exited with code {proc.exitcode} without a result"
    return {
        "model": name,
        "tool": tool,
        "ok": False,
        "error": cause,
        "stats": {},
        "wall_s": wall,
        "watched_peak_rss_mb": round(peak),
    }


# ------------------------------------------------------------------ summary and table
def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summary(records: dict[str, dict]) -> dict:
    sfx = [r["sparsifx"] for r in records.values() if "sparsifx" in r]
    out = {
        "models": len(records),
        "sparsifx_ok": sum(r["ok"] for r in sfx),
        "sparsifx_failures": {r["model"]: r["error"] for r in sfx if not r["ok"]},
        "sparsifx_latency_errors": {r["model"]: r["error"] for r in sfx if r["ok"] and r["error"]},
        "sparsifx_max_time_s": max((r["stats"]["time_s"] for r in sfx if "time_s" in r["stats"]), default=None),
    }
    for key in ("eager_latency_over_macs", "ort_latency_over_macs", "macs_ratio", "params_ratio"):
        out[f"median_{key}"] = _median([r["stats"][key] for r in sfx if key in r["stats"]])
    ort = [r["stats"]["ort_latency_over_macs"] for r in sfx if "ort_latency_over_macs" in r["stats"]]
    out["ort_latency_over_macs_at_most_1_1"] = f"{sum(v <= 1.1 for v in ort)}/{len(ort)}"
    out["physical_ratio"] = {
        r["model"]: round(r["stats"]["physical_ratio"], 3) for r in sfx if "physical_ratio" in r["stats"]
    }
    tps = [r for r in records.values() if "torch-pruning" in r]
    if tps:
        ok = [r for r in tps if r["torch-pruning"]["ok"]]
        ratios = [
            r["sparsifx"]["stats"]["time_s"] / r["torch-pruning"]["stats"]["time_s"]
            for r in ok
            if r.get("sparsifx", {}).get("ok")
        ]
        out.update(
            {
                "torch_pruning_ok": len(ok),
                "torch_pruning_runs": len(tps),
                "torch_pruning_failures": {
                    r["torch-pruning"]["model"]: r["torch-pruning"]["error"]
                    for r in tps
                    if not r["torch-pruning"]["ok"]
                },
                "median_time_ratio_sparsifx_over_tp": _median(ratios),
                "torch_pruning_max_time_s": max((r["torch-pruning"]["stats"]["time_s"] for r in ok), default=None),
            }
        )
    return out


def _fmt(v, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def markdown(records: dict[str, dict], meta: dict) -> str:
    s = meta["summary"]
    lines = [
        f"# torchvision channel-pruning sweep (ratio {meta['ratio']}, round_to {meta.get('round_to', 1)}; "
        "input side per model in the table)",
        "",
        f"sparsifx: {s['sparsifx_ok']}/{s['models']} models pruned, shrunk, verified and exported; "
        f"max pruning time {_fmt(s['sparsifx_max_time_s'])} s; median latency/MACs ratio eager "
        f"{_fmt(s['median_eager_latency_over_macs'])} (2 threads, wall clock), onnxruntime "
        f"{_fmt(s['median_ort_latency_over_macs'])} (1 thread, CPU clock; "
        f"{s.get('ort_latency_over_macs_at_most_1_1', '?')} models at most 1.1).",
        *([harness.load_line(meta)] if "load_before" in meta else []),
    ]
    if s.get("not_run"):
        lines.append(f"Not run ({len(s['not_run'])}): " + ", ".join(s["not_run"]))
    if "torch_pruning_ok" in s:
        lines.append(
            f"Torch-Pruning 1.6: {s['torch_pruning_ok']}/{s['torch_pruning_runs']}; median time ratio "
            f"sparsifx/TP {_fmt(s['median_time_ratio_sparsifx_over_tp'])}; TP max time "
            f"{_fmt(s['torch_pruning_max_time_s'])} s."
        )
    if s["physical_ratio"]:
        lines.append(
            "Physical limit (shrunk / fresh dense same shapes, eager): "
            + ", ".join(f"{k} {v:.3f}" for k, v in s["physical_ratio"].items())
        )
    lines += [
        "",
        "| model | side | ok | time s | TP time s | params after/before | MACs after/before | "
        "eager lat ratio | eager lat/MACs | ort lat ratio | ort lat/MACs | physical | peak RSS MB | error |",
        "|" + "---|" * 14,
    ]
    for name, r in records.items():
        x = r.get("sparsifx", {})
        st, tp = x.get("stats", {}), r.get("torch-pruning")
        tp_cell = "" if tp is None else (_fmt(tp["stats"].get("time_s")) if tp["ok"] else "fail")
        err = "; ".join(e for e in (x.get("error"), tp and not tp["ok"] and "TP " + tp["error"]) if e)
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    str(x.get("side", "")),
                    "yes" if x.get("ok") else "NO",
                    _fmt(st.get("time_s")),
                    tp_cell,
                    _fmt(st.get("params_ratio"), ".3f"),
                    _fmt(st.get("macs_ratio"), ".3f"),
                    _fmt(st.get("eager_latency_ratio"), ".3f"),
                    _fmt(st.get("eager_latency_over_macs")),
                    _fmt(st.get("ort_latency_ratio"), ".3f"),
                    _fmt(st.get("ort_latency_over_macs")),
                    _fmt(st.get("physical_ratio"), ".3f"),
                    _fmt(st.get("rss_peak_prune_mb"), ".0f"),
                    (err or "").replace("|", "/")[:160],
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write(records: dict[str, dict], out: Path, args: argparse.Namespace) -> dict:
    import torchvision

    meta = {
        **harness.machine(threads=2, clock="eager: wall; onnxruntime: cpu, 1 thread"),
        "ratio": args.ratio,
        "round_to": args.round_to,
        "mode": args.mode,
        "torchvision": torchvision.__version__,
        "batch": 1,
        "summary": summary(records),
    }
    meta["load_before"] = getattr(args, "load_before", meta["load_before"])  # at the start of the sweep
    harness.finish(meta)
    if args.models == "all" or args.merge:
        meta["summary"]["not_run"] = [n for n in all_models() if n not in records]
    harness.write_results(out, {"meta": meta, "records": records}, markdown(records, meta))
    return meta["summary"]


def _ordered(records: dict[str, dict], names: list[str]) -> dict[str, dict]:
    return {n: records[n] for n in names if n in records} | {n: r for n, r in records.items() if n not in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help="'all' or a comma-separated list")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument(
        "--round-to",
        type=int,
        default=16,
        help="kept channels per group rounded up to a multiple (both tools): 16 floats fill the SIMD "
        "blocks of onnxruntime's NCHWc kernels on AVX-512; narrower convs fall off them",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "torchvision_sweep.json")
    p.add_argument("--compare", choices=["torch-pruning"], default=None)
    p.add_argument("--mode", choices=["full", "ci"], default="full", help="input sizes (ci: small)")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model and tool")
    p.add_argument("--max-rss-gb", type=float, default=7.0, help="RSS cap per model and tool")
    p.add_argument("--resume", action="store_true", help="keep finished models from --out")
    p.add_argument("--rerun-failed", action="store_true", help="with --resume: run failed records again")
    p.add_argument("--jobs", type=int, default=1, help="models run concurrently (latency is noisier above 1)")
    p.add_argument("--merge", help="comma-separated result JSONs (parts of one sweep) to combine into --out")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        merged = {n: r for part in parts for n, r in part["records"].items()}
        order = all_models()
        print(json.dumps(write(_ordered(merged, order), args.out, args), indent=1))
        return 0
    names = all_models() if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    args.load_before = harness.load_average()
    records: dict[str, dict] = {}
    if args.resume and args.out.exists():
        records = json.loads(args.out.read_text())["records"]
    tools = ["sparsifx"] + ([args.compare] if args.compare else [])
    if args.resume and args.rerun_failed:
        records = {n: {t: r for t, r in recs.items() if r["ok"] or t != "sparsifx"} for n, recs in records.items()}
    preload(tools)
    lock, big_lock, slots = threading.Lock(), threading.Lock(), threading.Semaphore(args.jobs)
    heavy = {n for n in names if num_params(n) > HEAVY_PARAMS}

    def model_task(i: int, name: str) -> None:
        for tool in tools:
            if tool in records.get(name, {}):
                continue
            permits = args.jobs if name in heavy else 1  # heavy models run alone (memory)
            with big_lock if permits > 1 else contextlib.nullcontext():
                for _ in range(permits):
                    slots.acquire()
            try:
                rec = run_isolated(name, tool, args)
            finally:
                for _ in range(permits):
                    slots.release()
            st = rec.get("stats", {})
            with lock:
                records.setdefault(name, {})[tool] = rec
                print(
                    f"[{i + 1}/{len(names)}] {name:24s} {tool:14s} ok={rec['ok']} "
                    f"time={st.get('time_s', 0):.2f}s wall={rec['wall_s']}s {rec.get('error') or ''}",
                    flush=True,
                )
                write(_ordered(records, names), args.out, args)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(model_task, range(len(names)), names))
    records = _ordered(records, names)
    s = write(records, args.out, args)
    print(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
