"""Channel-pruning sweep over a model zoo (timm; a registry of zoo builders for more), optionally against
Torch-Pruning.

    python benchmarks/zoo_sweep.py --zoo timm --models all --ratio 0.5 --compare torch-pruning \\
        --out benchmarks/results/zoo_timm.json

Per model (random weights, batch 1, ``--side`` px, default 128, or the model's entry in ``Zoo.special``):
build -> re-randomise every norm's affine parameters and every constant-initialised parameter vector (timm's
layer scales ``gamma`` / ``ls1.gamma`` / ``layer_scale.scale``, NFNet's ``skipinit_gain``, ...), calibrate
BatchNorm statistics on a random batch and then perturb them (``randomise``), so that a pruning bug cannot hide
behind identity norms or 1e-5 layer scales -> ``channel_prune`` (``--ratio``, ``--round-to``) -> ``shrink``
through the recipe passes (``prune_sweep_worker.sparsifx_prune``: timed, shrunk == masked by ``assert_close``)
-> params and MACs before/after -> compact ONNX with onnxruntime parity (``prune_sweep_worker.compact_onnx``).
``channel_prune``'s ``PruneOutcome`` gives the achieved channel removal and the barriers ranked by channels held
whole. A model is *really pruned* when params after/before <= 0.6; every model above 0.8 is named with its top
barrier. With ``--compare torch-pruning`` Torch-Pruning 1.6 (``pip install -e .[compare,timm]``) prunes the
same randomised model in its own subprocess (L1 magnitude, classifier ignored, attention ``qkv`` grouped by
heads as in Torch-Pruning's timm example). Each (model, tool) runs in a forked subprocess with a time limit and
an RSS cap (``torchvision_sweep.run_isolated``); results are written after every model (JSON + markdown table
with the same basename); ``--resume`` skips finished models.

``--zoo hf``: tiny ``transformers`` models (BERT, RoBERTa, GPT-2, Llama and Mistral with grouped-query attention,
ViT, Swin, T5; ``zoo_hf_models.py``), random weights, norms re-randomised, traced with ``trace_hf``. Per model
(``sweep_hf_sparsifx``): Linear/Conv1D layers visible in the trace, ``magnitude`` masking of every one of them
(``sparsify``), exact ``channel_prune`` + ``shrink`` with the params ratio over the transformer blocks (the
encoder/decoder layer lists) and over the whole model, compact ONNX with onnxruntime parity, time; then, each on
a fresh copy of the same randomised model, ``channel_prune`` with ``streams: approximate`` + ``shrink`` (params
ratios, the output deviation ``shrink`` reports, shrunk vs original and shrunk vs masked, and ONNX parity against
the shrunk torch model; the summary counts the models at blocks ratio <= ``STREAMS_TARGET``) and an exact
``attention: heads`` run (params ratios, query heads kept, shrunk == masked). ``--compare torch-pruning`` runs
Torch-Pruning's documented HF recipes on the same model (``sweep_hf_torch_pruning``).

    python benchmarks/zoo_sweep.py --zoo hf --models all --ratio 0.5 --compare torch-pruning \\
        --out benchmarks/results/zoo_hf.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as `python benchmarks/<script>.py`: import `benchmarks` as a package
    sys.path[0] = str(HERE.parent)
from benchmarks import harness  # noqa: E402
from benchmarks import prune_sweep_worker as w  # noqa: E402
from benchmarks import torchvision_sweep as tvs  # noqa: E402
from benchmarks import zoo_hf_models as hfm  # noqa: E402
from benchmarks.models import informative_random_weights  # noqa: E402

REALLY_PRUNED, BARELY_PRUNED = 0.6, 0.8  # params after/before


# ------------------------------------------------------------------ zoo registry
@dataclass(frozen=True)
class Zoo:
    """A model zoo: its default model list, a builder ``(name, side, num_classes) -> nn.Module`` (random
    weights), per-model ``(side, kwargs)`` overrides, and the pip extra that provides it."""

    name: str
    models: tuple[str, ...]
    create: Callable[..., nn.Module]
    special: dict = field(default_factory=dict)
    extra: str = ""
    tools: dict = field(default_factory=dict)  # tool -> sweep function, where the zoo has its own
    report: tuple | None = None  # (summary, markdown) where the zoo has its own

    def side(self, model: str, default: int) -> int:
        return self.special.get(model, (default, {}))[0] or default

    def build(self, model: str, side: int, num_classes: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
        side = self.side(model, side)
        torch.manual_seed(0)
        module = self.create(model, side=side, num_classes=num_classes, **self.special.get(model, (None, {}))[1])
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
        return module, (x,)


ZOOS: dict[str, Zoo] = {}
PLANNED: dict[str, str] = {}  # zoo -> why ``--zoo <zoo>`` is refused (not implemented yet)


def register_zoo(zoo: Zoo) -> Zoo:
    ZOOS[zoo.name] = zoo
    return zoo


def create_timm(name: str, side: int, num_classes: int, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` at ``side`` px where the model takes ``img_size``."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=side, **kwargs)
    except TypeError as exc:  # convnets take any input size and no img_size argument
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


# the smallest variant of each family; 73 architectures
TIMM_MODELS = (
    "resnet18",
    "resnet18d",
    "seresnext26d_32x4d",
    "ecaresnet26t",
    "skresnet18",
    "resnest14d",
    "res2net50_26w_4s",
    "resnetv2_50x1_bit",
    "cspresnet50",
    "cs3darknet_s",
    "darknet17",
    "regnetx_002",
    "regnety_002",
    "regnetz_b16",
    "nf_resnet26",
    "nfnet_l0",
    "efficientnet_b0",
    "efficientnet_lite0",
    "tf_efficientnetv2_b0",
    "tinynet_e",
    "mixnet_s",
    "mnasnet_small",
    "fbnetc_100",
    "hardcorenas_a",
    "lcnet_050",
    "mobilenetv2_050",
    "mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "ghostnet_100",
    "ghostnetv2_100",
    "repghostnet_050",
    "rexnet_100",
    "repvgg_a0",
    "repvit_m0_9",
    "hgnetv2_b0",
    "ese_vovnet19b_dw",
    "dla46_c",
    "densenet121",
    "dpn48b",
    "hrnet_w18_small",
    "selecsls42b",
    "gernet_s",
    "xception41",
    "inception_v3",
    "starnet_s1",
    "convnext_atto",
    "convnextv2_atto",
    "inception_next_tiny",
    "edgenext_xx_small",
    "poolformer_s12",
    "poolformerv2_s12",
    "mambaout_femto",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "fastvit_t8",
    "efficientvit_b0",
    "efficientvit_m0",
    "levit_128s",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "beit_base_patch16_224",
    "eva02_tiny_patch14_224",
    "cait_xxs24_224",
    "xcit_nano_12_p16_224",
    "pit_ti_224",
    "pvt_v2_b0",
    "swin_tiny_patch4_window7_224",
    "tiny_vit_5m_224",
    "coatnet_nano_rw_224",
    "maxvit_nano_rw_256",
    "halonet26t",
    "botnet26t_256",
    "mixer_s16_224",
    "resmlp_12_224",
)
TIMM_SPECIAL = {  # model -> (side or None for --side, create kwargs)
    "swin_tiny_patch4_window7_224": (None, {"window_size": 4}),  # 128 px: 32/16/8/4 tokens per side
    "eva02_tiny_patch14_224": (112, {}),
    "efficientformer_l1": (224, {}),  # its last stage's attention biases are sized for 7 x 7 tokens
    "halonet26t": (256, {}),  # halo attention blocks of 8 need feature maps of 16+ in the last stage
    "tiny_vit_5m_224": (None, {"window_sizes": (4, 4, 4, 4)}),
}
TIMM = register_zoo(Zoo("timm", TIMM_MODELS, create_timm, TIMM_SPECIAL, extra="timm"))


# ------------------------------------------------------------------ random weights that expose pruning bugs
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES) or "Norm" in type(m).__name__  # timm's LayerNorm2d, RmsNorm, FrozenBN, ...


def _constant_vector(name: str, p: torch.Tensor) -> bool:
    """A vector (one non-1 dim) or scalar parameter initialised to one value: layer scales, gains, tokens."""
    return (
        name != "bias"
        and p.is_floating_point()
        and p.numel() > 0
        and p.numel() == max(p.shape, default=1)
        and bool((p == p.reshape(-1)[0]).all())
    )


def randomise(model: nn.Module, side: int) -> dict[str, int]:
    """Norm affine params ~ U(0.5, 1.5) / N(0, 0.2); constant parameter vectors (layer scales) ~ U(0.5, 1);
    then ``models.informative_random_weights`` (all-zero matrices redrawn, BatchNorm statistics calibrated on a random
    batch) and BatchNorm statistics perturbed (mean +- 0.1 std, var x U(0.8, 1.25)). Returns what it changed."""
    gen = torch.Generator().manual_seed(4)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=t.dtype)

    done = {"norm_affine": 0, "constant_vectors": 0, "bn_stats": 0}
    with torch.no_grad():
        for m in model.modules():
            own = dict(m.named_parameters(recurse=False))
            if _is_norm(m):
                if own.get("weight") is not None:
                    own["weight"].copy_(uniform(own["weight"], 0.5, 1.5))
                    done["norm_affine"] += 1
                if own.get("bias") is not None:
                    own["bias"].copy_(0.2 * torch.randn(own["bias"].shape, generator=gen))
                continue
            for pname, p in own.items():
                if _constant_vector(pname, p):
                    p.copy_(uniform(p, 0.5, 1.0))
                    done["constant_vectors"] += 1
    informative_random_weights(model, side)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.mul_(uniform(m.running_var, 0.8, 1.25))
                done["bn_stats"] += 1
    return done


def build(zoo: str, name: str, side: int, num_classes: int) -> tuple[nn.Module, tuple, dict]:
    model, inputs = ZOOS[zoo].build(name, side, num_classes)
    return model, inputs, randomise(model, inputs[0].shape[-1])


# ------------------------------------------------------------------ one model, one tool
def top_barrier(outcome) -> str:
    """The barrier kind holding most channels whole, or what else kept the channels."""
    if outcome is None:
        return "no outcome recorded"
    if outcome.blockers:
        b = outcome.blockers[0]
        more = f" (+{len(b['nodes']) - 1} more)" if len(b["nodes"]) > 1 else ""
        return f"{b['op']} '{b['nodes'][0]}'{more}: {b['channels']} ch, {b['reason']}"
    if outcome.other_fixed:
        return f"no barrier: {outcome.other_fixed} channels coupled to inputs/constants"
    return f"no barrier (achieved {outcome.achieved:.0%} of channels; unpruned params elsewhere)"


def sweep_sparsifx(
    name: str,
    zoo: str = "timm",
    ratio: float = 0.5,
    side: int = 128,
    num_classes: int = 1000,
    round_to: int = 1,
    onnx: bool = True,
    workdir: str | None = None,
    repeat: bool = True,
) -> dict:
    """Build + randomise, prune+shrink (timed; shrunk == masked), params/MACs, outcome, ONNX parity."""
    rec = w.Record(name, "sparsifx", ZOOS[zoo].side(name, side))
    st = rec.stats
    stage = "build"
    try:
        model, inputs, st["randomised"] = build(zoo, name, side, num_classes)
        stage = "count"
        st["params_before"], st["macs_before"] = w.count(model, inputs)
        stage = "prune+shrink"
        shrunk, info = w.sparsifx_prune(model, inputs, ratio, repeat, round_to)
        st.update(info)
        outcome = shrunk.meta.get("channel_outcome")
        st["outcome"] = outcome.to_dict() if outcome is not None else None
        st["top_barrier"] = top_barrier(outcome)
        st["rss_peak_prune_mb"] = w.rss_mb()
        stage = "count"
        st["params_after"], st["macs_after"] = w.count(shrunk, inputs)
        st["params_ratio"] = st["params_after"] / st["params_before"]
        st["macs_ratio"] = st["macs_after"] / st["macs_before"] if st["macs_before"] else None
        if onnx:
            stage = "onnx"
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                st.update(w.compact_onnx(shrunk, inputs, Path(tmp) / "after.onnx"))
        rec.ok = True
    except Exception as exc:  # every failure becomes a named cause in the record
        rec.error = w._cause(stage, exc)
    finally:
        gc.collect()
    return asdict(rec)


def sweep_torch_pruning(
    name: str, zoo: str = "timm", ratio: float = 0.5, side: int = 128, num_classes: int = 1000, round_to: int = 1
) -> dict:
    """Torch-Pruning 1.6 MagnitudePruner (L1) on the same randomised model: layers with ``num_classes`` outputs
    ignored, timm attention ``qkv`` grouped by heads and ``head_dim`` updated afterwards (Torch-Pruning's timm
    ViT example); the result must still return ``(1, num_classes)``."""
    import torch_pruning as tp

    rec = w.Record(name, "torch-pruning", ZOOS[zoo].side(name, side))
    st = rec.stats
    stage = "build"
    try:
        model, inputs, _ = build(zoo, name, side, num_classes)
        st["params_before"] = sum(p.numel() for p in model.parameters())
        stage = "prune"
        candidate, times = w.pruned_copies(model, lambda m: _tp_prune_once(tp, m, inputs, ratio, round_to, num_classes))
        st["time_s"] = min(times)
        stage = "forward after pruning"
        out = w.leaves(w.run(candidate.eval(), inputs))[0]
        if tuple(out.shape) != (1, num_classes):
            raise RuntimeError(f"pruned model returns shape {tuple(out.shape)}, expected (1, {num_classes})")
        st["params_after"] = sum(p.numel() for p in candidate.parameters())
        st["params_ratio"] = st["params_after"] / st["params_before"]
        rec.ok = True
    except Exception as exc:
        rec.error = w._cause(stage, exc)
    finally:
        gc.collect()
    return asdict(rec)


def _tp_prune_once(tp, model: nn.Module, inputs: tuple, ratio: float, round_to: int, num_classes: int) -> float:
    t0 = time.perf_counter()
    ignored = [
        m
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and getattr(m, "out_features", getattr(m, "out_channels", None)) == num_classes
    ]
    attention = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "num_heads", None), int)
        and hasattr(m, "head_dim")
    ]
    pruner = tp.pruner.MagnitudePruner(
        model,
        inputs[0],
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads={m.qkv: m.num_heads for m in attention},
        round_to=round_to if round_to > 1 else None,
    )
    pruner.step()
    for m in attention:
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.head_dim * m.num_heads
    return time.perf_counter() - t0


TOOLS: dict[str, Callable[..., dict]] = {"sparsifx": sweep_sparsifx, "torch-pruning": sweep_torch_pruning}


# ------------------------------------------------------------------ summary and table
def summary(records: dict[str, dict]) -> dict:
    sfx = {n: r["sparsifx"] for n, r in records.items() if "sparsifx" in r}
    ok = {n: r for n, r in sfx.items() if r["ok"]}
    ratio = {n: r["stats"]["params_ratio"] for n, r in ok.items()}
    shortfall = {n: r["stats"]["outcome"] for n, r in ok.items() if (r["stats"].get("outcome") or {}).get("channels")}
    out = {
        "models": len(records),
        "sparsifx_ok": len(ok),
        "sparsifx_failures": {n: r["error"] for n, r in sfx.items() if not r["ok"]},
        "really_pruned": f"{sum(v <= REALLY_PRUNED for v in ratio.values())}/{len(ratio)}",
        "above_0_8": {n: ok[n]["stats"]["top_barrier"] for n, v in ratio.items() if v > BARELY_PRUNED},
        "between_0_6_and_0_8": {n: round(v, 3) for n, v in ratio.items() if REALLY_PRUNED < v <= BARELY_PRUNED},
        "achieved_short_by_over_0_1": sorted(n for n, o in shortfall.items() if o["achieved"] < o["requested"] - 0.1),
        "median_params_ratio": tvs._median(list(ratio.values())),
        "median_achieved": tvs._median([o["achieved"] for o in shortfall.values()]),
        "max_shrunk_vs_masked_max_abs": max(
            (r["stats"]["shrunk_vs_masked_max_abs"] for r in ok.values()), default=None
        ),
        "max_onnx_max_abs": max(
            (r["stats"]["onnx_max_abs"] for r in ok.values() if r["stats"].get("onnx_max_abs") is not None),
            default=None,
        ),
        "sparsifx_max_time_s": max((r["stats"]["time_s"] for r in ok.values()), default=None),
    }
    tps = {n: r["torch-pruning"] for n, r in records.items() if "torch-pruning" in r}
    if tps:
        tp_ok = {n: r for n, r in tps.items() if r["ok"]}
        both = [n for n in tp_ok if n in ok]
        really = sum(r["stats"]["params_ratio"] <= REALLY_PRUNED for r in tp_ok.values())
        out.update(
            {
                "torch_pruning_ok": f"{len(tp_ok)}/{len(tps)}",
                "torch_pruning_failures": {n: r["error"] for n, r in tps.items() if not r["ok"]},
                "torch_pruning_really_pruned": f"{really}/{len(tp_ok)}",
                "median_params_ratio_torch_pruning": tvs._median([r["stats"]["params_ratio"] for r in tp_ok.values()]),
                "median_time_ratio_sparsifx_over_tp": tvs._median(
                    [ok[n]["stats"]["time_s"] / tp_ok[n]["stats"]["time_s"] for n in both]
                ),
                "tp_prunes_more_by_over_0_05": sorted(
                    n for n in both if tp_ok[n]["stats"]["params_ratio"] < ok[n]["stats"]["params_ratio"] - 0.05
                ),
            }
        )
    return out


def markdown(records: dict[str, dict], meta: dict) -> str:
    s, f = meta["summary"], tvs._fmt
    lines = [
        f"# {meta['zoo']} channel-pruning sweep (ratio {meta['ratio']}, round_to {meta['round_to']}, "
        f"{meta['num_classes']} classes, random weights re-randomised; input side per model in the table)",
        "",
        f"sparsifx: {s['sparsifx_ok']}/{s['models']} pruned, shrunk, exact (shrunk == masked) and exported "
        f"with onnxruntime parity; really pruned (params <= {REALLY_PRUNED}): {s['really_pruned']}; "
        f"median params ratio {f(s['median_params_ratio'], '.3f')}; median achieved channel removal "
        f"{f(s['median_achieved'], '.3f')}; max time {f(s['sparsifx_max_time_s'])} s.",
    ]
    if "torch_pruning_ok" in s:
        lines.append(
            f"Torch-Pruning 1.6: {s['torch_pruning_ok']} ran; really pruned "
            f"{s['torch_pruning_really_pruned']}; median params ratio "
            f"{f(s['median_params_ratio_torch_pruning'], '.3f')}; median time ratio sparsifx/TP "
            f"{f(s['median_time_ratio_sparsifx_over_tp'])}."
        )
    if s["above_0_8"]:
        lines += ["", f"Above {BARELY_PRUNED} (top barrier):"] + [f"- {n}: {b}" for n, b in s["above_0_8"].items()]
    lines += [
        "",
        "| model | side | ok | params M | params after/before | TP params after/before | MACs after/before | "
        "achieved / requested | top barrier | shrunk-masked max abs | onnx max abs | time s | TP time s | "
        "error |",
        "|" + "---|" * 14,
    ]
    for name, r in records.items():
        x, tp = r.get("sparsifx", {}), r.get("torch-pruning")
        st, o = x.get("stats", {}), x.get("stats", {}).get("outcome") or {}
        tps = tp["stats"] if tp and tp["ok"] else {}
        barrier = (
            st.get("top_barrier", "")
            if (st.get("params_ratio") or 0) > REALLY_PRUNED or (o and o["achieved"] < o["requested"] - 0.1)
            else ""
        )
        err = "; ".join(e for e in (x.get("error"), tp and not tp["ok"] and "TP " + tp["error"]) if e)
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    str(x.get("side", "")),
                    "yes" if x.get("ok") else "NO",
                    f(st.get("params_before") and st["params_before"] / 1e6, ".1f"),
                    f(st.get("params_ratio"), ".3f"),
                    f(tps.get("params_ratio"), ".3f") if tp else "",
                    f(st.get("macs_ratio"), ".3f"),
                    f"{o['achieved']:.2f} / {o['requested']:.2f}" if o.get("channels") else "",
                    barrier.replace("|", "/")[:90],
                    f(st.get("shrunk_vs_masked_max_abs"), ".1e"),
                    f(st.get("onnx_max_abs"), ".1e"),
                    f(st.get("time_s")),
                    f(tps.get("time_s")) if tp else "",
                    (err or "").replace("|", "/")[:160],
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write(records: dict[str, dict], out: Path, args: argparse.Namespace, names: list[str]) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", ZOOS[args.zoo].extra, "torch-pruning", "onnxruntime"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    summarise, tabulate = ZOOS[args.zoo].report or (summary, markdown)
    meta = {
        "zoo": args.zoo,
        "ratio": args.ratio,
        "round_to": args.round_to,
        "side": args.side,
        "num_classes": args.num_classes,
        "threads": 2,
        "batch": 1,
        "versions": versions,
        "machine": {
            "cpus": os.cpu_count(),
            "shared": "other workers run on the same cores at the same time",
            "loadavg_at_start": getattr(args, "loadavg_start", None),
            "loadavg_at_write": harness.load_average(),
        },
        "summary": summarise(records),
    }
    if args.zoo == "hf":
        meta["configs"] = hfm.CONFIGS
    meta["summary"]["not_run"] = [n for n in names if n not in records]
    harness.write_results(out, {"meta": meta, "records": records}, tabulate(records, meta))
    return meta["summary"]


# ------------------------------------------------------------------ Hugging Face zoo (--zoo hf)
STREAMS_TARGET = 0.35  # the issue's target: params ratio over the blocks with approximate streams at ratio 0.5


def create_hf(name: str, side: int = 0, num_classes: int = 0) -> nn.Module:
    """A tiny ``transformers`` model with random weights (``zoo_hf_models``; side and classes are fixed there)."""
    return hfm.build(name)[0]


def build_hf(name: str) -> tuple[nn.Module, dict, dict]:
    """The model (eval, ``use_cache`` off), its example inputs and what ``randomise`` changed."""
    model, inputs = hfm.build(name)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, inputs, randomise(model, hfm.SPECS[name].side)


def _hf_prune_once(model: nn.Module, inputs: dict, ratio: float, round_to: int) -> tuple[nn.Module, dict]:
    """``prune_sweep_worker._sparsifx_prune_once`` with ``trace_hf``: trace -> channel_prune -> (masked
    reference outputs, untimed) -> shrink; shrunk == masked by ``check_close``."""
    from sparsifx.hf_tracing import trace_hf

    return w._sparsifx_prune_once(
        model, tuple(inputs.values()), ratio, round_to, trace=lambda m: trace_hf(m, inputs, copy_model=False)
    )


def sweep_hf_sparsifx(
    name: str,
    zoo: str = "hf",
    ratio: float = 0.5,
    side: int = 0,
    num_classes: int = 0,
    round_to: int = 1,
    onnx: bool = True,
    workdir: str | None = None,
    repeat: bool = True,
) -> dict:
    """One HF model through sparsifx; each part records its own error and the next part still runs:
    ``trace``: ``trace_hf`` with every Linear/Conv1D a visible ``call_module``; ``magnitude``: ``sparsify`` with a
    magnitude stage masks every Linear/Conv1D; ``prune``: channel_prune + shrink (timed, shrunk == masked), params
    over the blocks and over the whole model, MACs; ``onnx``: compact ONNX with onnxruntime parity; ``approximate``:
    ``streams: approximate`` (``_hf_approximate_part``, keys ``approx_*``); ``heads``: exact ``attention: heads``
    (``_hf_heads_part``, keys ``heads_*``)."""
    from sparsifx import sparsify
    from sparsifx.hf_tracing import trace_hf
    from sparsifx.masking import is_masked

    rec = w.Record(name, "sparsifx", hfm.SPECS[name].side)
    st, errors = rec.stats, []
    try:
        model, inputs, st["randomised"] = build_hf(name)
    except Exception as exc:
        rec.error = w._cause("build", exc)
        return asdict(rec)
    tensors, layers = tuple(inputs.values()), hfm.linear_layers(model)
    prefixes = hfm.block_prefixes(model)
    st.update(
        inputs={k: list(v.shape) for k, v in inputs.items()}, block_prefixes=list(prefixes), linear_layers=len(layers)
    )
    gm = None
    try:  # trace: Linear/Conv1D visible
        t0 = time.perf_counter()
        gm = trace_hf(model, inputs)
        st["trace_verify_s"] = time.perf_counter() - t0
        visible = {n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in layers}
        st.update(
            linear_visible=len(visible),
            opaque_leaves=list(gm.meta["opaque_leaves"]),
            linear_hidden=sorted(set(layers) - visible)[:8],
        )
        st["params_before"], st["macs_before"] = w.count(gm, tensors)
        st["block_params_before"] = hfm.block_params(gm, prefixes)
    except Exception as exc:
        errors.append(w._cause("trace", exc))
    if gm is not None:
        try:  # magnitude masking through the recipe API
            t0 = time.perf_counter()
            masked = sparsify(gm, {"stages": [{"pass": "magnitude", "sparsity": 0.5}]}, example_inputs=tensors)
            st["magnitude_s"] = time.perf_counter() - t0
            done = [p for p in layers if is_masked(masked.get_submodule(p))]
            zeros = sum(int((masked.get_submodule(p).mask == 0).sum()) for p in done)
            st.update(
                magnitude_masked=len(done),
                magnitude_unmasked=sorted(set(layers) - set(done))[:8],
                magnitude_sparsity=zeros / max(1, sum(layers[p].weight.numel() for p in done)),
            )
            if len(done) != len(layers):
                errors.append(f"magnitude: {len(layers) - len(done)} of {len(layers)} Linear/Conv1D not masked")
        except Exception as exc:
            errors.append(w._cause("magnitude", exc))
    shrunk = None
    try:  # channel_prune + shrink, exactness, params over blocks and whole model
        shrunk, info = _hf_sparsifx_prune(model, inputs, ratio, repeat, round_to)
        st.update(info)
        outcome = shrunk.meta.get("channel_outcome")
        st["outcome"] = outcome.to_dict() if outcome is not None else None
        st["top_barrier"] = top_barrier(outcome)
        st["rss_peak_prune_mb"] = w.rss_mb()
        st["params_after"], st["macs_after"] = w.count(shrunk, tensors)
        st["block_params_after"] = hfm.block_params(shrunk, prefixes)
        st["untied"] = hfm.untied(hfm.tie_groups(model), shrunk)  # tied parameters no longer sharing one tensor
        if "params_before" not in st:  # the trace part failed; count the model itself
            st["params_before"], st["block_params_before"] = hfm.all_params(model), hfm.block_params(model, prefixes)
        st["params_ratio"] = st["params_after"] / st["params_before"]
        st["block_params_ratio"] = st["block_params_after"] / st["block_params_before"]
        st["macs_ratio"] = st["macs_after"] / st["macs_before"] if st.get("macs_before") else None
    except Exception as exc:
        shrunk = None
        errors.append(w._cause("prune+shrink", exc))
    if onnx and shrunk is not None:
        try:
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                st.update(w.compact_onnx(shrunk, tensors, Path(tmp) / "after.onnx"))
        except Exception as exc:
            st["onnx_error"] = w._cause("onnx", exc)
            errors.append(st["onnx_error"])
    if "block_params_before" not in st:  # the trace part failed: the ratios below count the model itself
        st["params_before"], st["block_params_before"] = hfm.all_params(model), hfm.block_params(model, prefixes)
    _hf_approximate_part(model, inputs, ratio, round_to, prefixes, st, errors, onnx, workdir)
    _hf_heads_part(model, inputs, ratio, round_to, prefixes, st, errors)
    rec.ok = not errors
    rec.error = "; ".join(errors) or None
    gc.collect()
    return asdict(rec)


def _hf_trace_copy(model: nn.Module, inputs: dict):
    """``trace_hf`` of a fresh deep copy of ``model`` with its example inputs recorded in ``gm.meta`` (so that
    ``streams: approximate`` measures its deviation on them, not on a random draw)."""
    from sparsifx.hf_tracing import trace_hf

    gm = trace_hf(copy.deepcopy(model), inputs, copy_model=False)
    gm.meta["example_inputs"] = tuple(inputs[k] for k in gm.meta["hf_input_names"])
    return gm


def _hf_approximate_part(
    model: nn.Module,
    inputs: dict,
    ratio: float,
    round_to: int,
    prefixes: tuple,
    st: dict,
    errors: list[str],
    onnx: bool,
    workdir: str | None,
) -> None:
    """``channel_prune(ratio, streams="approximate")`` + ``shrink`` on a fresh copy of the randomised model: params
    over the blocks and the whole model, the deviations ``shrink`` reports (``channel_report["streams"]``: shrunk vs
    original and shrunk vs masked, on the example inputs), the same shrunk-vs-original deviation recomputed here on
    the logits and every other float output, and compact ONNX with onnxruntime parity against the *shrunk* torch
    model. Keys ``approx_*``; failures go to ``approx_error`` / ``approx_onnx_error`` and to ``errors``."""
    from sparsifx.passes.channels.streams import relative_deviation
    from sparsifx.registry import PASSES

    tensors, shrunk = tuple(inputs.values()), None
    try:
        gm = _hf_trace_copy(model, inputs)
        dense = w.run(gm, tensors)
        t0 = time.perf_counter()
        params = {"ratio": ratio, "round_to": round_to, "streams": "approximate"}
        masked = PASSES.get("channel_prune").from_params(params)(gm).gm.eval()
        t1 = time.perf_counter()
        outcome = masked.meta.get("channel_outcome")
        masked_out = w.run(masked, tensors)  # untimed, as in the exact part
        t2 = time.perf_counter()
        shrunk = PASSES.get("shrink").from_params({})(masked).gm.eval()
        st["approx_time_s"] = (t1 - t0) + (time.perf_counter() - t2)
        report = shrunk.meta.get("channel_report", {}).get("streams")
        st["approx_outcome"] = outcome.to_dict() if outcome is not None else None
        st["approx_params_after"] = hfm.all_params(shrunk)
        st["approx_block_params_after"] = hfm.block_params(shrunk, prefixes)
        st["approx_params_ratio"] = st["approx_params_after"] / st["params_before"]
        st["approx_block_params_ratio"] = st["approx_block_params_after"] / st["block_params_before"]
        out = w.run(shrunk, tensors)
        st["approx_deviation_recomputed"] = relative_deviation(out, dense)
        st["approx_deviation_approximation_recomputed"] = relative_deviation(out, masked_out)
        if report is None:  # nothing pruned through a normalisation: the prune was exact after all
            outputs = [
                str(a)
                for a in torch.utils._pytree.tree_leaves([n.args for n in shrunk.graph.nodes if n.op == "output"])
                if isinstance(a, torch.fx.Node)
            ]
            st["approx_exact"] = True
            st["approx_note"] = (
                "no channel pruned through a normalisation, so this prune is exact (no deviation "
                "report; deviations recomputed here): the residual stream reaches a model output "
                f"(graph outputs {', '.join(outputs)}), and outputs are never pruned"
            )
        else:
            st.update(
                approx_deviation=report["deviation"],
                approx_deviation_approximation=report["deviation_approximation"],
                approx_deviation_masked=report["deviation_masked"],
                approx_units=report["units"],
                approx_norms=len(report["approximations"]),
                approx_deviation_inputs=report["inputs"],
                approx_exactness_check=report["exactness_check"],
            )
    except Exception as exc:
        shrunk = None
        st["approx_error"] = w._cause("approximate prune+shrink", exc)
        errors.append(st["approx_error"])
    if onnx and shrunk is not None:
        try:
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                facts = w.compact_onnx(shrunk, tensors, Path(tmp) / "approx.onnx")
            st.update({"approx_" + k: v for k, v in facts.items()})
        except Exception as exc:
            st["approx_onnx_error"] = w._cause("approximate onnx", exc)
            errors.append(st["approx_onnx_error"])


def head_shapes(gm: torch.fx.GraphModule) -> list[list[int]]:
    """[heads, head dim] of every attention's query in graph order: sdpa's query, or the left operand of a
    ``q @ k.transpose(..)`` matmul (as ``attention_heads.head_shapes``)."""
    import torch.nn.functional as F

    out = []
    for n in gm.graph.nodes:
        sdpa = n.op == "call_function" and n.target is F.scaled_dot_product_attention
        qk = (
            (n.op == "call_method" and n.target == "matmul" or n.op == "call_function" and n.target is torch.matmul)
            and len(n.args) > 1
            and isinstance(n.args[1], torch.fx.Node)
            and n.args[1].target == "transpose"
        )
        meta = n.args[0].meta.get("tensor_meta") if (sdpa or qk) and isinstance(n.args[0], torch.fx.Node) else None
        if meta is not None and len(meta.shape) >= 3:
            out.append([int(meta.shape[-3]), int(meta.shape[-1])])
    return out


def _hf_heads_part(
    model: nn.Module, inputs: dict, ratio: float, round_to: int, prefixes: tuple, st: dict, errors: list[str]
) -> None:
    """Exact ``channel_prune(ratio, attention="heads")`` (whole heads) + ``shrink`` on a fresh copy: params over
    the blocks and the whole model, heads x head dim of each attention before and after, shrunk == masked by
    ``check_close``. Keys ``heads_*``; a failure goes to ``heads_error`` and to ``errors``."""
    from sparsifx.registry import PASSES

    tensors = tuple(inputs.values())
    try:
        gm = _hf_trace_copy(model, inputs)
        st["heads_before"] = head_shapes(gm)
        t0 = time.perf_counter()
        params = {"ratio": ratio, "round_to": round_to, "attention": "heads"}
        masked = PASSES.get("channel_prune").from_params(params)(gm).gm.eval()
        t1 = time.perf_counter()
        reference = w.run(masked, tensors)
        t2 = time.perf_counter()
        shrunk = PASSES.get("shrink").from_params({})(masked).gm.eval()
        st["heads_time_s"] = (t1 - t0) + (time.perf_counter() - t2)
        st["heads_after"] = head_shapes(shrunk)
        st["heads_kept"] = sum(h for h, _ in st["heads_after"])
        st["heads_total"] = sum(h for h, _ in st["heads_before"])
        st["heads_params_ratio"] = hfm.all_params(shrunk) / st["params_before"]
        st["heads_block_params_ratio"] = hfm.block_params(shrunk, prefixes) / st["block_params_before"]
        out = w.run(shrunk, tensors)
        st["heads_shrunk_vs_masked_max_abs"] = w.max_abs(out, reference)  # recorded before the check can fail
        w.check_close(out, reference)
        st["heads_exact"] = True
    except Exception as exc:
        if "heads_shrunk_vs_masked_max_abs" in st:
            st["heads_exact"] = False
        st["heads_error"] = w._cause("heads prune+shrink", exc)
        errors.append(st["heads_error"])


def _hf_sparsifx_prune(model: nn.Module, inputs: dict, ratio: float, repeat: bool, round_to: int):
    best = None
    for _ in range(2 if repeat else 1):
        shrunk, info = _hf_prune_once(model, inputs, ratio, round_to)
        if best is None or info["time_s"] < best[1]["time_s"]:
            best = (shrunk, info)
        if info["time_s"] > w.REPEAT_BELOW_S:
            break
    return best


def sweep_hf_torch_pruning(
    name: str, zoo: str = "hf", ratio: float = 0.5, side: int = 0, num_classes: int = 0, round_to: int = 1
) -> dict:
    """Torch-Pruning 1.6 on the same randomised HF model with its documented HF recipes (``_tp_prune_hf``); the
    pruned model must still return logits of the dense model's shape."""
    import torch_pruning as tp

    rec = w.Record(name, "torch-pruning", hfm.SPECS[name].side)
    st = rec.stats
    stage = "build"
    try:
        model, inputs, _ = build_hf(name)
        prefixes = hfm.block_prefixes(model)
        st["params_before"], st["block_params_before"] = hfm.all_params(model), hfm.block_params(model, prefixes)
        ties = hfm.tie_groups(model)
        with torch.no_grad():
            dense_shape = tuple(model(**inputs).logits.shape)
        stage = "prune"

        def prune_once(m: nn.Module) -> float:
            seconds, st["recipe"] = _tp_prune_hf(tp, m, inputs, hfm.SPECS[name], ratio, round_to)
            return seconds

        candidate, times = w.pruned_copies(model, prune_once)
        st["time_s"] = min(times)
        stage = "forward after pruning"
        with torch.no_grad():
            shape = tuple(candidate.eval()(**inputs).logits.shape)
        if shape != dense_shape:
            raise RuntimeError(f"pruned model returns logits of shape {shape}, expected {dense_shape}")
        st["params_after"] = hfm.all_params(candidate)
        st["block_params_after"] = hfm.block_params(candidate, prefixes)
        st["untied"] = hfm.untied(ties, candidate)  # tied parameters that no longer share one tensor
        st["params_ratio"] = st["params_after"] / st["params_before"]
        st["block_params_ratio"] = st["block_params_after"] / st["block_params_before"]
        rec.ok = True
    except Exception as exc:
        rec.error = w._cause(stage, exc)
    finally:
        gc.collect()
    return asdict(rec)


def _tp_customized(tp) -> tuple[dict, dict]:
    """Customized pruners for layers Torch-Pruning does not know, built the documented way
    (``tp.BasePruningFunc``): transformers' ``Conv1D`` (GPT-2; a Linear with a transposed [in, out] weight) and
    ``SwinPatchMerging`` (its 4 concatenated neighbours: the pruner of TP's ``prune_swin.py`` example, reading
    ``dim`` from the layer's ``reduction`` since transformers 5 dropped ``dim``). Returns (pruners, root types)."""
    from transformers.models.swin.modeling_swin import SwinPatchMerging
    from transformers.pytorch_utils import Conv1D

    def keep(n: int, idxs) -> list[int]:
        drop = set(int(i) for i in idxs)
        return [i for i in range(n) if i not in drop]

    class Conv1DPruner(tp.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            k = keep(layer.weight.shape[1], idxs)
            layer.weight = nn.Parameter(layer.weight.data[:, k].clone())
            layer.bias = nn.Parameter(layer.bias.data[k].clone())
            layer.nf = len(k)
            return layer

        def prune_in_channels(self, layer, idxs):
            k = keep(layer.weight.shape[0], idxs)
            layer.weight = nn.Parameter(layer.weight.data[k].clone())
            layer.nx = len(k)
            return layer

        def get_out_channels(self, layer):
            return layer.weight.shape[1]

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    class PatchMergingPruner(tp.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            tp.prune_linear_out_channels(layer.reduction, idxs)
            return layer

        def prune_in_channels(self, layer, idxs):
            dim = layer.reduction.in_features // 4
            repeated = [i + j * dim for j in range(4) for i in idxs]
            tp.prune_linear_in_channels(layer.reduction, repeated)
            tp.prune_layernorm_out_channels(layer.norm, repeated)
            return layer

        def get_out_channels(self, layer):
            return layer.reduction.out_features

        def get_in_channels(self, layer):
            return layer.reduction.in_features // 4

    return {Conv1D: Conv1DPruner(), SwinPatchMerging: PatchMergingPruner()}, {
        Conv1D: [nn.Linear, Conv1D],
        SwinPatchMerging: [nn.Linear, nn.LayerNorm, SwinPatchMerging],
    }


def _tp_prune_hf(tp, model: nn.Module, inputs: dict, spec, ratio: float, round_to: int) -> tuple[float, str]:
    """Torch-Pruning's documented HF recipes on ``model`` (in place); returns (seconds, the recipe in words).

    Encoders and GPT-2/T5 (``examples/hf_transformers``: prune_bert/prune_vit/prune_swin): L2 magnitude
    (``group_reduction="mean"``), q/k/v grouped by heads (``num_heads``), head dims pruned and heads kept
    (``prune_head_dims=True, prune_num_heads=False``), the output head ignored, then each attention's head-size
    attributes rewritten. Llama/Mistral (``examples/LLMs/prune_llm.py``): ``GroupMagnitudeImportance(p=2)``,
    q heads and GQA k/v heads from the config, whole heads pruned at the same ratio (``prune_num_heads=True,
    prune_head_dims=False``, keeping RoPE's head_dim), ``round_to=4``, ``lm_head`` ignored, then heads, key/value
    groups, hidden and intermediate sizes written back to the modules and config. Both prune the hidden size
    (residual stream, embeddings, norms) too: Torch-Pruning removes norm channels without exactness."""
    a, cfg = spec.tp, model.config
    t0 = time.perf_counter()
    attention = [m for m in model.modules() if type(m).__name__.endswith(a.cls)]

    def heads(m: nn.Module, key: str) -> int:
        return getattr(cfg, key[len("config.") :]) if key.startswith("config.") else getattr(m, key)

    head = model.get_submodule(spec.head)
    pruners, roots = _tp_customized(tp)
    used = {t for t in pruners if any(isinstance(m, t) for m in model.modules())}
    extra = (
        dict(
            customized_pruners={t: pruners[t] for t in used},
            root_module_types=list(dict.fromkeys(sum((roots[t] for t in used), [nn.Linear]))),
        )
        if used
        else {}
    )
    if a.kv_heads:  # LLM recipe
        num_heads = {}
        for m in attention:
            num_heads[getattr(m, a.qkv[0])] = heads(m, a.heads)
            for p in a.qkv[1:]:
                num_heads[getattr(m, p)] = heads(m, a.kv_heads)
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=[head],
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
            round_to=max(4, round_to),
            output_transform=lambda out: out.logits,
            **extra,
        )
        for g in pruner.step(interactive=True):
            g.prune()
        cfg.hidden_size = head.in_features
        for m in attention:
            q_heads = getattr(m, a.qkv[0]).out_features // m.head_dim
            kv_heads = getattr(m, a.qkv[1]).out_features // m.head_dim
            m.num_key_value_groups = q_heads // kv_heads
            cfg.num_attention_heads, cfg.num_key_value_heads = q_heads, kv_heads
        for m in model.modules():
            if hasattr(m, "gate_proj"):
                cfg.intermediate_size = m.gate_proj.out_features
        recipe = (
            "examples/LLMs/prune_llm.py: MetaPruner, GroupMagnitudeImportance(p=2, mean), num_heads q/k/v "
            f"(GQA), prune_num_heads=True, head_pruning_ratio={ratio}, prune_head_dims=False, round_to="
            f"{max(4, round_to)}, ignored [{spec.head}]"
        )
    else:  # encoder recipe
        num_heads = {getattr(m, p): heads(m, a.heads) for m in attention for p in a.qkv}
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=inputs,
            importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=[head],
            num_heads=num_heads,
            prune_num_heads=False,
            prune_head_dims=True,
            round_to=round_to if round_to > 1 else None,
            output_transform=lambda out: out.logits.sum(),
            **extra,
        )
        for g in pruner.step(interactive=True):
            g.prune()
        for m in attention:
            n, proj = heads(m, a.heads), getattr(m, a.qkv[0])
            width = proj.weight.shape[1] if type(proj).__name__ == "Conv1D" else proj.out_features
            if len(a.qkv) == 1:  # fused q/k/v
                width //= 3
            for attr in a.head_dim_attrs:
                setattr(m, attr, width // n)
            for attr in a.all_head_attrs:
                setattr(m, attr, width)
            if a.split_attr:
                setattr(m, a.split_attr, width)
        recipe = (
            "examples/hf_transformers (prune_bert/vit/swin): MetaPruner, MagnitudeImportance(p=2, mean), "
            "num_heads on q/k/v, prune_head_dims=True, prune_num_heads=False, "
            f"ignored [{spec.head}]" + (f", customized pruners {sorted(t.__name__ for t in used)}" if used else "")
        )
    return time.perf_counter() - t0, recipe


def _approx_deviations(st: dict) -> dict:
    """The approximate run's deviations: ``shrink``'s report, or (when nothing was pruned through a norm and
    there is no report) the ones recomputed by the sweep, flagged ``exact``."""
    if st.get("approx_exact"):
        return {
            "shrunk_vs_original": st.get("approx_deviation_recomputed"),
            "shrunk_vs_masked": st.get("approx_deviation_approximation_recomputed"),
            "exact": True,
        }
    return {
        "shrunk_vs_original": st.get("approx_deviation"),
        "shrunk_vs_masked": st.get("approx_deviation_approximation"),
    }


def hf_summary(records: dict[str, dict]) -> dict:
    sfx = {n: r["sparsifx"] for n, r in records.items() if "sparsifx" in r}
    tps = {n: r["torch-pruning"] for n, r in records.items() if "torch-pruning" in r}
    sts = {n: r["stats"] for n, r in sfx.items()}

    def count(pred) -> str:
        return f"{sum(bool(pred(st)) for st in sts.values())}/{len(sts)}"

    def values(key: str, rs: dict) -> list[float]:
        return [r["stats"][key] for r in rs.values() if r["stats"].get(key) is not None]

    tp_ok = {n: r for n, r in tps.items() if r["ok"]}
    out = {
        "models": len(records),
        "sparsifx_all_parts_ok": f"{sum(r['ok'] for r in sfx.values())}/{len(sfx)}",
        "traced_every_linear_visible": count(lambda st: st.get("linear_visible") == st.get("linear_layers")),
        "magnitude_masked_every_linear": count(lambda st: st.get("magnitude_masked") == st.get("linear_layers")),
        "exact_shrunk_eq_masked": count(lambda st: "shrunk_vs_masked_max_abs" in st),
        "onnx_parity": count(lambda st: "onnx_max_abs" in st),
        "median_block_params_ratio": tvs._median(values("block_params_ratio", sfx)),
        "median_params_ratio": tvs._median(values("params_ratio", sfx)),
        "max_shrunk_vs_masked_max_abs": max(values("shrunk_vs_masked_max_abs", sfx), default=None),
        "max_onnx_max_abs": max(values("onnx_max_abs", sfx), default=None),
        "sparsifx_max_time_s": max(values("time_s", sfx), default=None),
        "sparsifx_failures": {n: r["error"] for n, r in sfx.items() if r["error"]},
    }
    approx = {n: st for n, st in sts.items() if st.get("approx_block_params_ratio") is not None}
    reach = sorted(n for n, st in approx.items() if st["approx_block_params_ratio"] <= STREAMS_TARGET)
    out["approximate_streams"] = {
        "ran": f"{len(approx)}/{len(sts)}",
        "blocks_ratio_target": STREAMS_TARGET,
        "reach_target": f"{len(reach)}/{len(sts)}",
        "reach_target_models": reach,
        "miss_target": {n: round(st["approx_block_params_ratio"], 3) for n, st in approx.items() if n not in reach},
        "median_block_params_ratio": tvs._median([st["approx_block_params_ratio"] for st in approx.values()]),
        "median_params_ratio": tvs._median([st["approx_params_ratio"] for st in approx.values()]),
        "deviations": {n: _approx_deviations(st) for n, st in approx.items()},
        "streams_not_pruned": {n: st["approx_note"] for n, st in approx.items() if st.get("approx_note")},
        "onnx_parity": count(lambda st: "approx_onnx_max_abs" in st),
        "max_onnx_max_abs": max(values("approx_onnx_max_abs", sfx), default=None),
        "failures": {
            n: "; ".join(st[k] for k in ("approx_error", "approx_onnx_error") if st.get(k))
            for n, st in sts.items()
            if st.get("approx_error") or st.get("approx_onnx_error")
        },
    }
    out["attention_heads"] = {
        "exact_shrunk_eq_masked": count(lambda st: st.get("heads_exact")),
        "median_block_params_ratio": tvs._median(values("heads_block_params_ratio", sfx)),
        "heads_kept": {n: f"{st['heads_kept']}/{st['heads_total']}" for n, st in sts.items() if "heads_kept" in st},
        "failures": {n: st["heads_error"] for n, st in sts.items() if st.get("heads_error")},
    }
    if tps:
        both = [n for n in tp_ok if n in sfx and sfx[n]["stats"].get("time_s")]
        out.update(
            {
                "torch_pruning_ok": f"{len(tp_ok)}/{len(tps)}",
                "torch_pruning_failures": {n: r["error"] for n, r in tps.items() if not r["ok"]},
                "median_block_params_ratio_torch_pruning": tvs._median(values("block_params_ratio", tp_ok)),
                "median_params_ratio_torch_pruning": tvs._median(values("params_ratio", tp_ok)),
                "median_time_ratio_sparsifx_over_tp": tvs._median(
                    [sfx[n]["stats"]["time_s"] / tp_ok[n]["stats"]["time_s"] for n in both]
                ),
            }
        )
    f = tvs._fmt
    out["per_model"] = {}
    for n in records:
        st = sts.get(n, {})
        tp = tps.get(n)
        line = (
            f"blocks {f(st.get('block_params_ratio'), '.3f')} whole {f(st.get('params_ratio'), '.3f')} "
            f"exact {f(st.get('shrunk_vs_masked_max_abs'), '.1e') or 'NO'} "
            f"onnx {f(st.get('onnx_max_abs'), '.1e') or 'NO'} | approx blocks "
            f"{f(st.get('approx_block_params_ratio'), '.3f') or 'NO'} whole "
            f"{f(st.get('approx_params_ratio'), '.3f') or 'NO'} deviation vs original / vs masked "
            f"{_fmt_deviations(_approx_deviations(st))} onnx "
            f"{f(st.get('approx_onnx_max_abs'), '.1e') or 'NO'} | heads blocks "
            f"{f(st.get('heads_block_params_ratio'), '.3f') or 'NO'} kept {st.get('heads_kept', '?')}/"
            f"{st.get('heads_total', '?')} exact {f(st.get('heads_shrunk_vs_masked_max_abs'), '.1e') or 'NO'}"
            + ("" if st.get("heads_exact") else " (NOT exact)" if "heads_exact" in st else "")
        )
        if tp is not None:
            line += (
                f" | TP blocks {f(tp['stats'].get('block_params_ratio'), '.3f')} whole "
                f"{f(tp['stats'].get('params_ratio'), '.3f')}"
                if tp["ok"]
                else " | TP failed"
            )
        out["per_model"][n] = line
    return out


def _fmt_deviations(d: dict) -> str:
    f = tvs._fmt
    text = f"{f(d.get('shrunk_vs_original'), '.3f') or '-'} / {f(d.get('shrunk_vs_masked'), '.3f') or '-'}"
    return text + " (exact prune)" if d.get("exact") else text


def hf_markdown(records: dict[str, dict], meta: dict) -> str:
    s, f, m = meta["summary"], tvs._fmt, meta.get("machine", {})
    load = ", ".join(f"{k} {v}" for k, v in m.items() if k.startswith("loadavg"))
    lines = [
        f"# Hugging Face channel-pruning sweep (ratio {meta['ratio']}, round_to {meta['round_to']}; tiny "
        "random-weight configs, norms re-randomised)",
        "",
        f"Machine load: {m.get('cpus', '?')} CPU cores shared with other workers running at the same time "
        f"(1/5/15-min load averages: {load}); times are wall clock and noisy. Configs: {meta.get('configs', '')}",
        "",
        f"sparsifx: all parts ok {s['sparsifx_all_parts_ok']}; every Linear/Conv1D visible in the trace "
        f"{s['traced_every_linear_visible']}; magnitude masked every Linear/Conv1D "
        f"{s['magnitude_masked_every_linear']}; channel_prune + shrink exact (shrunk == masked) "
        f"{s['exact_shrunk_eq_masked']}; ONNX with onnxruntime parity {s['onnx_parity']}; median params ratio "
        f"over blocks {f(s['median_block_params_ratio'], '.3f')}, whole model {f(s['median_params_ratio'], '.3f')}"
        f"; max time {f(s['sparsifx_max_time_s'])} s.",
    ]
    a, h = s.get("approximate_streams") or {}, s.get("attention_heads") or {}
    if a:
        devs = ", ".join(f"{n} {_fmt_deviations(d)}" for n, d in a["deviations"].items())
        lines.append(
            f"Approximate streams (`channel_prune` ratio {meta['ratio']}, `streams: approximate`, + `shrink`; not "
            f"exact by design): {a['reach_target']} models reach blocks ratio <= {a['blocks_ratio_target']} (the "
            f"issue's target: {', '.join(a['reach_target_models']) or 'none'}"
            + (f"; not: {', '.join(f'{n} {v}' for n, v in a['miss_target'].items())}" if a["miss_target"] else "")
            + f"); ran {a['ran']}; median params ratio over blocks {f(a['median_block_params_ratio'], '.3f')}, whole "
            f"model {f(a['median_params_ratio'], '.3f')}; ONNX with onnxruntime parity against the shrunk model "
            f"{a['onnx_parity']} (max abs {f(a['max_onnx_max_abs'], '.1e')}). Output deviation, relative L2 on the "
            f"example inputs, shrunk vs original / shrunk vs masked (the approximation alone): {devs or 'none'}."
            + "".join(f" {n}: {note}." for n, note in a["streams_not_pruned"].items())
            + (" Failures: " + "; ".join(f"{n}: {e}" for n, e in a["failures"].items()) + "." if a["failures"] else "")
        )
    if h:
        lines.append(
            f"Whole heads (`attention: heads`, exact): shrunk == masked {h['exact_shrunk_eq_masked']}; median params "
            f"ratio over blocks {f(h['median_block_params_ratio'], '.3f')}; query heads kept (all attentions): "
            + ", ".join(f"{n} {v}" for n, v in h["heads_kept"].items())
            + (". Failures: " + "; ".join(f"{n}: {e}" for n, e in h["failures"].items()) if h["failures"] else "")
            + "."
        )
    if "torch_pruning_ok" in s:
        lines.append(
            f"Torch-Pruning 1.6 (its HF recipes, see `recipe` in the JSON): {s['torch_pruning_ok']} ran; "
            f"median params ratio over blocks {f(s['median_block_params_ratio_torch_pruning'], '.3f')}, "
            f"whole model {f(s['median_params_ratio_torch_pruning'], '.3f')}; median time ratio sparsifx/TP "
            f"{f(s['median_time_ratio_sparsifx_over_tp'])} (exact run). Torch-Pruning also prunes the hidden "
            "size (norm channels, embeddings) without an exactness check or a measured deviation; sparsifx's "
            "exact mode keeps the residual stream whole (hence its high whole-model ratio on models with "
            "large embeddings), its approximate-streams mode prunes it and reports the deviation."
        )
    lines += [
        "",
        "Exact: `channel_prune` (default `streams: exact`, `attention: head_dims`) + `shrink`, shrunk == "
        "masked. Approx.: `streams: approximate` on a fresh copy of the same model; deviation = relative L2 of "
        "the outputs on the example inputs, shrunk vs original / shrunk vs masked "
        '(`channel_report["streams"]`; "exact prune": nothing was pruned through a norm, no report, the '
        "sweep's own figures); approx. ONNX = max |onnxruntime - shrunk torch|. Heads: exact `attention: heads`,"
        " query heads kept / total over all attentions, max |shrunk - masked|.",
        "",
        "| model | seq/side | Linear visible | magnitude masked | blocks after/before | whole after/before | "
        "MACs after/before | achieved / requested | shrunk-masked max abs | ONNX max abs | approx. blocks | "
        "approx. whole | approx. deviation (vs original / vs masked) | approx. ONNX max abs | approx. time s | "
        "heads blocks | heads kept | heads shrunk-masked max abs | time s | TP blocks | TP whole | TP time s | "
        "errors / notes |",
        "|" + "---|" * 23,
    ]
    for name, r in records.items():
        x, tp = r.get("sparsifx", {}), r.get("torch-pruning")
        st, tps = x.get("stats", {}), (tp or {}).get("stats", {})
        o = st.get("outcome") or {}
        untied = [
            f"{who} untied tied weights: " + ", ".join(s_["untied"])
            for who, s_ in (("sparsifx", st), ("TP", tps))
            if s_.get("untied")
        ]
        notes = [f"approx.: {st['approx_note']}"] if st.get("approx_note") else []
        err = "; ".join(e for e in (x.get("error"), tp and not tp["ok"] and "TP " + tp["error"], *untied, *notes) if e)
        dev = _fmt_deviations(_approx_deviations(st)) if "approx_block_params_ratio" in st else ""
        heads = f"{st['heads_kept']}/{st['heads_total']}" if "heads_kept" in st else ""
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    str(x.get("side", "")),
                    f"{st.get('linear_visible', '?')}/{st.get('linear_layers', '?')}",
                    f"{st.get('magnitude_masked', '?')}/{st.get('linear_layers', '?')}",
                    f(st.get("block_params_ratio"), ".3f"),
                    f(st.get("params_ratio"), ".3f"),
                    f(st.get("macs_ratio"), ".3f"),
                    f"{o['achieved']:.2f} / {o['requested']:.2f}" if o.get("channels") else "",
                    f(st.get("shrunk_vs_masked_max_abs"), ".1e") or "NO",
                    f(st.get("onnx_max_abs"), ".1e") or "NO",
                    f(st.get("approx_block_params_ratio"), ".3f") or "NO",
                    f(st.get("approx_params_ratio"), ".3f") or "NO",
                    dev,
                    f(st.get("approx_onnx_max_abs"), ".1e") or "NO",
                    f(st.get("approx_time_s")),
                    f(st.get("heads_block_params_ratio"), ".3f") or "NO",
                    heads,
                    (f(st.get("heads_shrunk_vs_masked_max_abs"), ".1e") or "NO")
                    + ("" if st.get("heads_exact", True) else " (NOT exact)"),
                    f(st.get("time_s")),
                    f(tps.get("block_params_ratio"), ".3f") if tp else "",
                    f(tps.get("params_ratio"), ".3f") if tp else "",
                    f(tps.get("time_s")) if tp else "",
                    (err or "").replace("|", "/")[:400],
                ]
            )
            + " |"
        )
    barriers = {
        n: r["sparsifx"]["stats"].get("top_barrier")
        for n, r in records.items()
        if r.get("sparsifx", {}).get("stats", {}).get("top_barrier")
    }
    if barriers:
        lines += ["", "Top barrier per model (what keeps channels whole):"] + [
            f"- {n}: {b}" for n, b in barriers.items()
        ]
    return "\n".join(lines) + "\n"


HF = register_zoo(
    Zoo(
        "hf",
        hfm.HF_MODELS,
        create_hf,
        {n: (s.side, {}) for n, s in hfm.SPECS.items()},
        extra="transformers",
        tools={"sparsifx": sweep_hf_sparsifx, "torch-pruning": sweep_hf_torch_pruning},
        report=(hf_summary, hf_markdown),
    )
)


# ------------------------------------------------------------------ driver
def _tool(fn: Callable[..., dict], zoo: str, side: int, num_classes: int) -> Callable[..., dict]:
    """Adapt a tool to ``torchvision_sweep._child``'s call ``fn(name, ratio=, round_to=, mode=)``."""

    @functools.wraps(fn)
    def call(name: str, ratio: float, round_to: int, mode: str) -> dict:
        return fn(name, zoo=zoo, ratio=ratio, side=side, num_classes=num_classes, round_to=round_to)

    return call


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True, choices=sorted({*ZOOS, *PLANNED}))
    p.add_argument("--models", default="all", help="'all' (the zoo's default list) or a comma-separated list")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=1, help="kept channels per group rounded up (both tools)")
    p.add_argument("--side", type=int, default=128, help="input side in px (Zoo.special overrides per model)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/zoo_<zoo>.json")
    p.add_argument("--compare", choices=["torch-pruning"], default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model and tool")
    p.add_argument("--max-rss-gb", type=float, default=6.0, help="RSS cap per model and tool")
    p.add_argument("--resume", action="store_true", help="keep finished models from --out")
    args = p.parse_args(argv)
    if args.zoo in PLANNED:
        p.error(f"--zoo {args.zoo}: {PLANNED[args.zoo]}")
    if not 0.0 <= args.ratio < 1.0:
        p.error("--ratio must be in [0, 1)")
    args.out = args.out or HERE / "results" / f"zoo_{args.zoo}.json"
    args.mode, args.no_latency = "full", True  # what torchvision_sweep.run_isolated passes on
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    zoo = ZOOS[args.zoo]
    names = list(zoo.models) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    records: dict[str, dict] = json.loads(args.out.read_text())["records"] if args.resume and args.out.exists() else {}
    tools = ["sparsifx"] + ([args.compare] if args.compare else [])
    args.loadavg_start = harness.load_average()
    for tool in tools:  # the forked children find them in the worker's table
        w.TOOLS[f"{zoo.name}:{tool}"] = _tool(zoo.tools.get(tool, TOOLS[tool]), zoo.name, args.side, args.num_classes)
    tvs.preload(tools)
    __import__(zoo.extra)
    if zoo.name == "hf":  # imported once here; the forked children inherit them
        import transformers.pytorch_utils  # noqa: F401

        import sparsifx.hf_tracing  # noqa: F401
    for i, name in enumerate(names):
        for tool in tools:
            if tool in records.get(name, {}):
                continue
            rec = tvs.run_isolated(name, f"{zoo.name}:{tool}", args)
            rec["tool"] = tool
            rec["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
            st = rec.get("stats", {})
            records.setdefault(name, {})[tool] = rec
            print(
                f"[{i + 1}/{len(names)}] {name:32s} {tool:14s} ok={rec['ok']} "
                f"params={st.get('params_ratio', float('nan')):.3f} time={st.get('time_s', 0):.2f}s "
                f"wall={rec['wall_s']}s {rec.get('error') or ''}",
                flush=True,
            )
            write(tvs._ordered(records, names), args.out, args, names)
    print(json.dumps(write(tvs._ordered(records, names), args.out, args, names), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
