"""sparsifx demo (``make demo``): sparsify a torchvision resnet18, export a verified ONNX file, print the report.

Each section is one function ``section(cfg) -> None`` registered in ``SECTIONS``; ``--only NAME`` runs
one. A new section (channel pruning, sparse backends, ...) adds a function and one ``SECTIONS`` entry.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision

import sparsifx

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"


@dataclass(frozen=True)
class DemoConfig:
    out_dir: Path
    input_size: int = 224
    seed: int = 0


def heading(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def resnet18(cfg: DemoConfig) -> torch.nn.Module:
    """resnet18 with random weights (weights=None, fixed seed); BatchNorm statistics are calibrated on
    a few random batches so that folding them is not a no-op."""
    torch.manual_seed(cfg.seed)
    model = torchvision.models.resnet18(weights=None)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, cfg.input_size, cfg.input_size))
    return model.eval()


def example_input(cfg: DemoConfig, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(cfg.seed))


def print_history(gm: torch.fx.GraphModule) -> None:
    for record in gm.meta["history"]:
        check = "verified" if record.verified else "not verified (does not claim to preserve outputs)"
        print(f"  pass {record.name:<12} modified={record.modified!s:<5}  {check}")


def export_verified(gm: torch.nn.Module, path: Path, x: torch.Tensor) -> Path:
    """Export with onnx.checker + onnxruntime verification (raises BackendError on a mismatch)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # export_onnx writes only into existing folders
    info = sparsifx.export_onnx(gm, path, (x,), dynamic_batch=True, verify=True)
    print(f"  wrote {info.path} ({info.file_bytes / 2**20:.1f} MiB, {info.exporter} exporter, opset {info.opset})")
    for check in info.checks:
        print(f"  onnxruntime vs torch, batch {check.batch}: max |diff| = {check.max_abs:.2e}")
    return info.path


def section_unstructured(cfg: DemoConfig) -> None:
    """Magnitude pruning (ERK, 80%) + BatchNorm folding from examples/recipes/resnet18_magnitude.yaml."""
    recipe_path = RECIPES / "resnet18_magnitude.yaml"
    heading(f"unstructured magnitude pruning: {recipe_path.relative_to(ROOT)}")
    model, x = resnet18(cfg), example_input(cfg)
    recipe = sparsifx.Recipe.from_yaml(recipe_path)
    start = time.perf_counter()
    gm = sparsifx.sparsify(model, recipe, example_inputs=(x,), verify=True, progress=True)
    print(f"  sparsify: {len(recipe.stages)} stages in {time.perf_counter() - start:.1f} s")
    print_history(gm)
    export_verified(gm, cfg.out_dir / "resnet18_magnitude.onnx", x)
    heading("report")
    print(sparsifx.report(gm, (x,)))


# ---------------------------------------------------------------- channel pruning (issue 3)
def _median_ms(fns: dict[str, Callable[[], object]], rounds: int = 15) -> dict[str, float]:
    """Median milliseconds per call, measured in interleaved rounds (one call of each per round)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _ort_runner(path: Path, x: torch.Tensor, threads: int = 2) -> Callable[[], object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # no spin-waiting after a run: idle pool threads would steal the cores from whatever runs next
    # (the other model of an interleaved pair, or torch), skewing every ratio measured that way
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def section_channels(cfg: DemoConfig) -> None:
    """Structured pruning: 50% of the channels of every coupled group, shrunk to smaller layers, compact ONNX."""
    heading("channel pruning: channel_prune 50% + shrink + fold_bn, compact ONNX")
    model, x = resnet18(cfg), example_input(cfg)
    dense = sparsifx.trace(model, (x,))
    recipe = sparsifx.Recipe.from_dict(
        {"stages": [{"pass": "channel_prune", "ratio": 0.5, "importance": "l1"}, {"pass": "shrink"}]}
    )
    start = time.perf_counter()
    shrunk = sparsifx.sparsify(model, recipe, example_inputs=(x,), verify=True)  # verify: shrunk == masked
    print(f"  channel_prune + shrink: {time.perf_counter() - start:.1f} s (shrink verified against the masked model)")
    print_history(shrunk)
    deploy = {}
    for name, gm in (("dense", dense), ("pruned", shrunk)):
        folded = sparsifx.sparsify(gm, {"stages": [{"pass": "fold_bn"}]}, example_inputs=(x,), verify=True)
        deploy[name] = export_verified(folded, cfg.out_dir / f"resnet18_{name}_bnfolded.onnx", x)
    path = cfg.out_dir / "resnet18_pruned.sfx"
    sparsifx.save(shrunk, path)
    torch.testing.assert_close(sparsifx.load(path).eval()(x), shrunk.eval()(x), rtol=0, atol=0)
    print(f"  saved {path} (plain data + tensors, torch.load(weights_only=True)); reloaded outputs identical")
    torch.set_num_threads(2)
    with torch.no_grad():
        lat = _median_ms(
            {
                "eager dense": lambda: dense(x),
                "eager pruned": lambda: shrunk(x),
                "ort dense": _ort_runner(deploy["dense"], x),
                "ort pruned": _ort_runner(deploy["pruned"], x),
            }
        )
    before, after = sparsifx.report(dense, (x,)), sparsifx.report(shrunk, (x,))
    heading(f"resnet18 before / after (input {cfg.input_size} px, batch 1, 2 threads, medians of interleaved runs)")
    rows = [
        ("params", before.total_params, after.total_params),
        ("MACs", before.total_macs, after.total_macs),
        ("eager latency ms", lat["eager dense"], lat["eager pruned"]),
        ("onnxruntime latency ms", lat["ort dense"], lat["ort pruned"]),
    ]
    print(f"  {'':24s}{'before':>14s}{'after':>14s}{'after/before':>14s}")
    for label, b, a in rows:
        fmt = "{:>14,.0f}" if isinstance(b, int) else "{:>14.2f}"
        print(f"  {label:24s}" + fmt.format(b) + fmt.format(a) + f"{a / b:>14.3f}")


SECTIONS: dict[str, Callable[[DemoConfig], None]] = {
    "unstructured": section_unstructured,
    "channels": section_channels,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out", help="output folder (default: out/)")
    parser.add_argument("--input-size", type=int, default=224, help="square input size (default: 224)")
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = DemoConfig(out_dir=args.out, input_size=args.input_size)
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            section(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
