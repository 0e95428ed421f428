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
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prune_sweep_worker as w  # noqa: E402
import torchvision_sweep as tvs  # noqa: E402

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

    def side(self, model: str, default: int) -> int:
        return self.special.get(model, (default, {}))[0] or default

    def build(self, model: str, side: int, num_classes: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
        side = self.side(model, side)
        torch.manual_seed(0)
        module = self.create(model, side=side, num_classes=num_classes, **self.special.get(model, (None, {}))[1])
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
        return module, (x,)


ZOOS: dict[str, Zoo] = {}
PLANNED = {"hf": "the Hugging Face zoo is not implemented yet: add a Zoo to zoo_sweep.ZOOS (see TIMM)"}


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
    "resnet18", "resnet18d", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18", "resnest14d", "res2net50_26w_4s",
    "resnetv2_50x1_bit", "cspresnet50", "cs3darknet_s", "darknet17", "regnetx_002", "regnety_002", "regnetz_b16",
    "nf_resnet26", "nfnet_l0", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0", "tinynet_e",
    "mixnet_s", "mnasnet_small", "fbnetc_100", "hardcorenas_a", "lcnet_050", "mobilenetv2_050",
    "mobilenetv3_small_100", "mobilenetv4_conv_small", "ghostnet_100", "ghostnetv2_100", "repghostnet_050",
    "rexnet_100", "repvgg_a0", "repvit_m0_9", "hgnetv2_b0", "ese_vovnet19b_dw", "dla46_c", "densenet121", "dpn48b",
    "hrnet_w18_small", "selecsls42b", "gernet_s", "xception41", "inception_v3", "starnet_s1", "convnext_atto",
    "convnextv2_atto", "inception_next_tiny", "edgenext_xx_small", "poolformer_s12", "poolformerv2_s12",
    "mambaout_femto", "mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0", "fastvit_t8",
    "efficientvit_b0", "efficientvit_m0", "levit_128s", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "pit_ti_224", "pvt_v2_b0", "swin_tiny_patch4_window7_224", "tiny_vit_5m_224",
    "coatnet_nano_rw_224", "maxvit_nano_rw_256", "halonet26t", "botnet26t_256", "mixer_s16_224", "resmlp_12_224",
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
    return (name != "bias" and p.is_floating_point() and p.numel() > 0 and p.numel() == max(p.shape, default=1)
            and bool((p == p.reshape(-1)[0]).all()))


def randomise(model: nn.Module, side: int) -> dict[str, int]:
    """Norm affine params ~ U(0.5, 1.5) / N(0, 0.2); constant parameter vectors (layer scales) ~ U(0.5, 1);
    then ``prune_sweep_worker.prepare`` (all-zero matrices redrawn, BatchNorm statistics calibrated on a random
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
    w.prepare(model, side)
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


def sweep_sparsifx(name: str, zoo: str = "timm", ratio: float = 0.5, side: int = 128, num_classes: int = 1000,
                   round_to: int = 1, onnx: bool = True, workdir: str | None = None, repeat: bool = True) -> dict:
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


def sweep_torch_pruning(name: str, zoo: str = "timm", ratio: float = 0.5, side: int = 128, num_classes: int = 1000,
                        round_to: int = 1) -> dict:
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
        times = []
        for _ in range(2):
            candidate = copy.deepcopy(model)
            times.append(_tp_prune_once(tp, candidate, inputs, ratio, round_to, num_classes))
            if times[-1] > w.REPEAT_BELOW_S:
                break
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
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               and getattr(m, "out_features", getattr(m, "out_channels", None)) == num_classes]
    attention = [m for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)
                 and isinstance(getattr(m, "num_heads", None), int) and hasattr(m, "head_dim")]
    pruner = tp.pruner.MagnitudePruner(model, inputs[0], importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=ignored,
                                       num_heads={m.qkv: m.num_heads for m in attention},
                                       round_to=round_to if round_to > 1 else None)
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
    out = {"models": len(records), "sparsifx_ok": len(ok),
           "sparsifx_failures": {n: r["error"] for n, r in sfx.items() if not r["ok"]},
           "really_pruned": f"{sum(v <= REALLY_PRUNED for v in ratio.values())}/{len(ratio)}",
           "above_0_8": {n: ok[n]["stats"]["top_barrier"] for n, v in ratio.items() if v > BARELY_PRUNED},
           "between_0_6_and_0_8": {n: round(v, 3) for n, v in ratio.items() if REALLY_PRUNED < v <= BARELY_PRUNED},
           "achieved_short_by_over_0_1": sorted(n for n, o in shortfall.items()
                                                if o["achieved"] < o["requested"] - 0.1),
           "median_params_ratio": tvs._median(list(ratio.values())),
           "median_achieved": tvs._median([o["achieved"] for o in shortfall.values()]),
           "max_shrunk_vs_masked_max_abs": max((r["stats"]["shrunk_vs_masked_max_abs"] for r in ok.values()),
                                               default=None),
           "max_onnx_max_abs": max((r["stats"]["onnx_max_abs"] for r in ok.values()
                                    if r["stats"].get("onnx_max_abs") is not None), default=None),
           "sparsifx_max_time_s": max((r["stats"]["time_s"] for r in ok.values()), default=None)}
    tps = {n: r["torch-pruning"] for n, r in records.items() if "torch-pruning" in r}
    if tps:
        tp_ok = {n: r for n, r in tps.items() if r["ok"]}
        both = [n for n in tp_ok if n in ok]
        really = sum(r["stats"]["params_ratio"] <= REALLY_PRUNED for r in tp_ok.values())
        out.update({"torch_pruning_ok": f"{len(tp_ok)}/{len(tps)}",
                    "torch_pruning_failures": {n: r["error"] for n, r in tps.items() if not r["ok"]},
                    "torch_pruning_really_pruned": f"{really}/{len(tp_ok)}",
                    "median_params_ratio_torch_pruning": tvs._median([r["stats"]["params_ratio"]
                                                                      for r in tp_ok.values()]),
                    "median_time_ratio_sparsifx_over_tp": tvs._median([ok[n]["stats"]["time_s"] /
                                                                       tp_ok[n]["stats"]["time_s"] for n in both]),
                    "tp_prunes_more_by_over_0_05": sorted(n for n in both if tp_ok[n]["stats"]["params_ratio"] <
                                                          ok[n]["stats"]["params_ratio"] - 0.05)})
    return out


def markdown(records: dict[str, dict], meta: dict) -> str:
    s, f = meta["summary"], tvs._fmt
    lines = [f"# {meta['zoo']} channel-pruning sweep (ratio {meta['ratio']}, round_to {meta['round_to']}, "
             f"{meta['num_classes']} classes, random weights re-randomised; input side per model in the table)", "",
             f"sparsifx: {s['sparsifx_ok']}/{s['models']} pruned, shrunk, exact (shrunk == masked) and exported "
             f"with onnxruntime parity; really pruned (params <= {REALLY_PRUNED}): {s['really_pruned']}; "
             f"median params ratio {f(s['median_params_ratio'], '.3f')}; median achieved channel removal "
             f"{f(s['median_achieved'], '.3f')}; max time {f(s['sparsifx_max_time_s'])} s."]
    if "torch_pruning_ok" in s:
        lines.append(f"Torch-Pruning 1.6: {s['torch_pruning_ok']} ran; really pruned "
                     f"{s['torch_pruning_really_pruned']}; median params ratio "
                     f"{f(s['median_params_ratio_torch_pruning'], '.3f')}; median time ratio sparsifx/TP "
                     f"{f(s['median_time_ratio_sparsifx_over_tp'])}.")
    if s["above_0_8"]:
        lines += ["", f"Above {BARELY_PRUNED} (top barrier):"] + [f"- {n}: {b}" for n, b in s["above_0_8"].items()]
    lines += ["", "| model | side | ok | params M | params after/before | TP params after/before | MACs after/before | "
              "achieved / requested | top barrier | shrunk-masked max abs | onnx max abs | time s | TP time s | "
              "error |", "|" + "---|" * 14]
    for name, r in records.items():
        x, tp = r.get("sparsifx", {}), r.get("torch-pruning")
        st, o = x.get("stats", {}), x.get("stats", {}).get("outcome") or {}
        tps = tp["stats"] if tp and tp["ok"] else {}
        barrier = st.get("top_barrier", "") if (st.get("params_ratio") or 0) > REALLY_PRUNED or \
            (o and o["achieved"] < o["requested"] - 0.1) else ""
        err = "; ".join(e for e in (x.get("error"), tp and not tp["ok"] and "TP " + tp["error"]) if e)
        lines.append("| " + " | ".join([
            name, str(x.get("side", "")), "yes" if x.get("ok") else "NO",
            f(st.get("params_before") and st["params_before"] / 1e6, ".1f"), f(st.get("params_ratio"), ".3f"),
            f(tps.get("params_ratio"), ".3f") if tp else "", f(st.get("macs_ratio"), ".3f"),
            f"{o['achieved']:.2f} / {o['requested']:.2f}" if o.get("channels") else "",
            barrier.replace("|", "/")[:90], f(st.get("shrunk_vs_masked_max_abs"), ".1e"),
            f(st.get("onnx_max_abs"), ".1e"), f(st.get("time_s")), f(tps.get("time_s")) if tp else "",
            (err or "").replace("|", "/")[:160]]) + " |")
    return "\n".join(lines) + "\n"


def write(records: dict[str, dict], out: Path, args: argparse.Namespace, names: list[str]) -> dict:
    import importlib.metadata as md
    versions = {}
    for pkg in ("torch", ZOOS[args.zoo].extra, "torch-pruning", "onnxruntime"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    meta = {"zoo": args.zoo, "ratio": args.ratio, "round_to": args.round_to, "side": args.side,
            "num_classes": args.num_classes, "threads": 2, "batch": 1, "versions": versions,
            "summary": summary(records)}
    meta["summary"]["not_run"] = [n for n in names if n not in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    out.with_suffix(".md").write_text(markdown(records, meta))
    return meta["summary"]


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
    for tool in tools:  # the forked children find them in the worker's table
        w.TOOLS[f"{zoo.name}:{tool}"] = _tool(TOOLS[tool], zoo.name, args.side, args.num_classes)
    tvs.preload(tools)
    __import__(zoo.extra)
    for i, name in enumerate(names):
        for tool in tools:
            if tool in records.get(name, {}):
                continue
            rec = tvs.run_isolated(name, f"{zoo.name}:{tool}", args)
            rec["tool"] = tool
            st = rec.get("stats", {})
            records.setdefault(name, {})[tool] = rec
            print(f"[{i + 1}/{len(names)}] {name:32s} {tool:14s} ok={rec['ok']} "
                  f"params={st.get('params_ratio', float('nan')):.3f} time={st.get('time_s', 0):.2f}s "
                  f"wall={rec['wall_s']}s {rec.get('error') or ''}", flush=True)
            write(tvs._ordered(records, names), args.out, args, names)
    print(json.dumps(write(tvs._ordered(records, names), args.out, args, names), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
