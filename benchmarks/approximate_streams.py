"""``channel_prune(streams=exact|approximate)`` + ``shrink`` on transformers: parameters kept and output deviation.

For each model and each ``streams`` mode at one ratio: params of the transformer blocks (modules under the layer
list) and of the whole model after shrink, as fractions of the dense ones, and the relative L2 deviation of the
shrunk model's outputs from the original on the example inputs (``||y_pruned - y||/||y||``); with ``approximate``
also the deviation of the shrunk model from the masked one (the approximation alone: statistics over fewer
channels), as ``gm.meta["channel_report"]["streams"]`` gives it. Models are randomly initialised (no pretrained
weights), so deviations say what the pruning does to a random network, not to accuracy: fine-tune afterwards.

    python benchmarks/approximate_streams.py [--ratio 0.5] [--image 64] [--models vit_b_16 swin_t bert gpt2 llama]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import harness  # noqa: E402
from sparsifx.pass_manager import run_model  # noqa: E402
from sparsifx.passes.channels import ChannelPrune, Shrink  # noqa: E402
from sparsifx.passes.channels.streams import relative_deviation  # noqa: E402
from sparsifx.tracing import trace  # noqa: E402

HF = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=100)
BLOCKS = {
    "vit_b_16": r"^encoder\.layers\.",
    "swin_t": r"^features\.[1357]\.",
    "bert": r"^bert\.encoder\.layer\.",
    "gpt2": r"^transformer\.h\.",
    "llama": r"^model\.layers\.",
}


def build(name: str, image: int):
    """(traced GraphModule with example inputs recorded, the config text)."""
    torch.manual_seed(0)
    if name in ("vit_b_16", "swin_t"):
        import torchvision

        model = torchvision.models.vit_b_16(image_size=image) if name == "vit_b_16" else torchvision.models.swin_t()
        if name == "vit_b_16":  # torchvision zero-initialises the head: every output would be 0
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
        gm = trace(model.eval(), (x,))
        gm.meta["example_inputs"] = (x,)
        return gm, f"torchvision, random init, 1x3x{image}x{image}"
    import transformers

    from sparsifx.hf_tracing import trace_hf

    model = {
        "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**HF, max_position_embeddings=32)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_embd=64,
                n_head=4,
                n_inner=128,
                n_layer=2,
                vocab_size=100,
                n_positions=32,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**HF, num_key_value_heads=2, max_position_embeddings=32)
        ),
    }[name]()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    gm = trace_hf(model.eval(), inputs)
    gm.meta["example_inputs"] = tuple(inputs[k] for k in gm.meta["hf_input_names"])
    return gm, "transformers tiny config (hidden 64, 4 heads, MLP 128, 2 layers, vocab 100), random init, ids 2x8"


def params(gm, pattern: str | None = None) -> int:
    return sum(p.numel() for n, p in gm.named_parameters() if pattern is None or re.match(pattern, n))


def measure(name: str, streams: str, ratio: float, image: int) -> dict:
    gm, config = build(name, image)
    inputs = gm.meta["example_inputs"]
    reference = run_model(gm, inputs)
    blocks0, whole0 = params(gm, BLOCKS[name]), params(gm)
    start = time.perf_counter()
    ChannelPrune(ratio=ratio, streams=streams)(gm)
    outcome = gm.meta["channel_outcome"]
    barriers = [f"{b['op']} x{len(b['nodes'])} [{b['reason']}]: {b['channels']} channels" for b in outcome.blockers]
    Shrink()(gm)
    seconds = time.perf_counter() - start
    gm.graph.lint()
    report = gm.meta["channel_report"].get("streams") or {}
    return {
        "model": name,
        "config": config,
        "streams": streams,
        "ratio": ratio,
        "blocks_ratio": params(gm, BLOCKS[name]) / blocks0,
        "whole_ratio": params(gm) / whole0,
        "deviation": relative_deviation(run_model(gm, inputs), reference),
        "deviation_approximation": report.get("deviation_approximation"),
        "approximated_norms": len(report.get("approximations", ())),
        "achieved": outcome.achieved,
        "barriers": barriers[:6],
        "prune_shrink_s": seconds,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# channel_prune streams: exact vs approximate (ratio {meta['ratio']})",
        "",
        f"{harness.load_line(meta)} The CPUs are shared with other workers: timings are indicative only.",
        "",
        "Blocks: params of the modules under the layer list (vit_b_16 `encoder.layers`, swin_t "
        "`features.1/3/5/7`, HF `*.layer`/`h`/`layers`) after shrink over dense; whole: all params. "
        "Deviation: relative L2 of the "
        "outputs, shrunk vs original, on the example inputs; approx. only: shrunk vs masked (the normalisation "
        "statistics over fewer channels). Random-init models: fine-tune after an approximate prune.",
        "",
        "swin_t prunes through its attention because `channel_prune` first rewrites torchvision's fused "
        "`shifted_window_attention` into graph ops (`window_attention.py`); a fused call left as is stays a "
        "declared barrier holding its stage's stream whole.",
        "",
        "| model | input | streams | blocks ratio | whole ratio | deviation | approx. only | norms approximated "
        "| prune+shrink s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        approx = "-" if r["deviation_approximation"] is None else f"{r['deviation_approximation']:.3f}"
        lines.append(
            f"| {r['model']} | {r['config']} | {r['streams']} | {r['blocks_ratio']:.3f} | "
            f"{r['whole_ratio']:.3f} | {r['deviation']:.3f} | {approx} | {r['approximated_norms']} | "
            f"{r['prune_shrink_s']:.1f} |"
        )
    lines += [
        "",
        "Barriers holding requested channels whole (`channel_outcome.blockers`; exact mode: the norms hold "
        "the residual stream):",
        "",
    ]
    lines += [f"- {r['model']} ({r['streams']}): {'; '.join(r['barriers']) or 'none'}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--image", type=int, default=64, help="torchvision image side (a multiple of 16 for vit_b_16)")
    ap.add_argument("--models", nargs="+", default=list(BLOCKS))
    ap.add_argument("--out", default="benchmarks/results/approximate_streams")
    args = ap.parse_args()
    meta = harness.machine(clock="wall", ratio=args.ratio, image=args.image)
    rows = []
    for name in args.models:
        for streams in ("exact", "approximate"):
            row = measure(name, streams, args.ratio, args.image)
            rows.append(row)
            print(
                f"{name:9s} {streams:11s} blocks {row['blocks_ratio']:.3f} whole {row['whole_ratio']:.3f} "
                f"deviation {row['deviation']:.3f} approx-only {row['deviation_approximation']} "
                f"({row['prune_shrink_s']:.1f}s)",
                flush=True,
            )
    harness.finish(meta)
    harness.write_results(Path(args.out).with_suffix(".json"), {"meta": meta, "rows": rows}, markdown(rows, meta))


if __name__ == "__main__":
    main()
