"""Console script ``sparsifx``.

    sparsifx run RECIPE --model torchvision:resnet18 [--input-shape 1,3,224,224] [--onnx out.onnx]
                 [--verify] [--save out.pt] [--plot layers.png] [--json]
    sparsifx inspect FILE [--input-shape 1,3,224,224] [--unsafe-pickle] [--plot layers.png] [--json]

``run`` applies a recipe (YAML file) to a model, prints the report and optionally writes a verified ONNX file
(``--onnx``), a saved module (``--save``, ``sparsifx.save``) and a figure of per-layer parameters, density and
MACs before and after the recipe (``--plot``, needs matplotlib). Model sources, all with random weights and
no network access:

- ``torchvision:<name>``;
- ``timm:<name>`` (``timm.create_model(name, pretrained=False)``; the default input is the model's own
  ``input_size``);
- ``hf:<model type>`` (a tiny default config of that type, e.g. ``hf:bert``, built with
  ``AutoConfig.for_model``) or ``hf:<config.json or a directory holding one>``; the model is built from the
  config (its ``architectures`` class if it names one, else ``AutoModel``) and traced with ``trace_hf`` on
  ``input_ids`` of shape ``--input-shape`` (default 1,16), or ``pixel_values`` for vision models;
- ``python:<module>:<callable>`` returning an ``nn.Module``.

``--verify`` checks every semantics-preserving pass numerically; the ONNX file is always checked against
onnxruntime. ``inspect`` prints per-initializer parameters and non-zeros of an ``.onnx`` file, or the report of
a module saved by ``sparsifx.save`` (a plain ``torch.save``'d module only with ``--unsafe-pickle``: it runs
arbitrary code from the file). Errors are one line on stderr and a non-zero exit code. Progress bars for the
long steps go to stderr when it is a terminal (``SPARSIFX_PROGRESS=0`` turns them off).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect as _inspect
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import CliError, SparsifxError
from .progress import enabled as progress_enabled
from .progress import progress
from .registry import Registry

log = logging.getLogger(__name__)

MODEL_SOURCES: Registry = Registry("model source")
EXIT_USAGE, EXIT_ERROR = 2, 1
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
DEFAULT_TEXT_SHAPE = (1, 16)
# ``hf:<model type>``: the type's default config with these set where the config has them (random weights)
HF_TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class Built:
    """What a ``--model`` source gives: the module, its example inputs, and options for ``export_onnx``."""

    model: Any
    inputs: tuple
    onnx_kwargs: dict = field(default_factory=dict)


def _image_inputs(shape: tuple[int, ...] | None, default: tuple[int, ...] = DEFAULT_IMAGE_SHAPE) -> tuple:
    import torch

    return (torch.randn(*(shape or default)),)


def _missing(extra: str, package: str, exc: ImportError) -> CliError:
    return CliError(
        f"--model {extra}:... needs {package}, which is not installed ({exc}); pip install sparsifx[{extra}]"
    )


def _unknown(kind: str, name: str, names: Sequence[str]) -> CliError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6) or list(names[:5])
    return CliError(f"unknown {kind} '{name}'; e.g. {', '.join(close)}, ...")


@MODEL_SOURCES.register("torchvision")
def _torchvision_model(name: str, shape: tuple[int, ...] | None = None) -> Built:
    try:
        import torchvision
    except ImportError as exc:
        raise CliError("torchvision is not installed (pip install sparsifx[test])") from exc
    names = torchvision.models.list_models()
    if name not in names:
        raise CliError(f"unknown torchvision model '{name}'; e.g. {', '.join(names[:5])}, ...")
    return Built(torchvision.models.get_model(name, weights=None), _image_inputs(shape))


@MODEL_SOURCES.register("timm")
def _timm_model(name: str, shape: tuple[int, ...] | None = None) -> Built:
    try:
        import timm
    except ImportError as exc:
        raise _missing("timm", "timm", exc) from exc
    names = timm.list_models()
    if name not in names:
        raise _unknown("timm model", name, names)
    model = timm.create_model(name, pretrained=False)  # random weights: nothing is downloaded
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size") or DEFAULT_IMAGE_SHAPE[1:])
    return Built(model, _image_inputs(shape, (1, *size)))


@MODEL_SOURCES.register("python")
def _python_model(spec: str, shape: tuple[int, ...] | None = None) -> Built:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise CliError(f"python model spec must be python:<module>:<callable>, got 'python:{spec}'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot import {module_name}:{attr}: {exc}") from exc
    return Built(factory(), _image_inputs(shape))


@MODEL_SOURCES.register("hf")
def _hf_model(spec: str, shape: tuple[int, ...] | None = None) -> Built:
    """A transformers model with random weights from a local config or a model type's tiny default config,
    traced with ``trace_hf``. ``from_pretrained`` is never called: nothing is looked up on the hub."""
    try:
        import transformers
    except ImportError as exc:
        raise _missing("hf", "transformers", exc) from exc
    config = _hf_config(spec)
    model = _hf_class(transformers, config)(config).eval()
    inputs = _hf_inputs(model, config, shape)
    from .hf_tracing import trace_hf

    gm = trace_hf(model, inputs)
    # the traced graph is specialised to the example's shapes: export it at that batch size only
    return Built(gm, tuple(inputs.values()), {"dynamic_batch": False})


def _hf_config(spec: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return _hf_config_file(path, CONFIG_MAPPING, AutoConfig)
    if spec.endswith(".json") or "/" in spec or "\\" in spec:
        raise CliError(
            f"hf: no config file at '{spec}' (hf: takes a local config.json, a directory holding one, "
            "or a model type such as bert; nothing is downloaded)"
        )
    names = sorted(CONFIG_MAPPING.keys())
    if spec not in CONFIG_MAPPING:
        raise _unknown("transformers model type", spec, names)
    config = AutoConfig.for_model(spec)
    for key, value in HF_TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    return config


def _hf_config_file(path: Path, mapping, auto_config):
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CliError(f"{path}: not a transformers config (larger than {MAX_CONFIG_BYTES} bytes)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CliError(f"{path}: not a readable JSON config ({exc})") from exc
    model_type = data.pop("model_type", None) if isinstance(data, dict) else None
    if isinstance(data, dict) and data.pop("auto_map", None) is not None:  # remote code is never loaded
        log.warning("hf: %s names remote code (auto_map); ignored, the transformers class is used", path)
    if model_type not in mapping:
        raise CliError(f"{path}: 'model_type' must name a transformers model type (e.g. bert), got {model_type!r}")
    try:
        return auto_config.for_model(model_type, **data)
    except (TypeError, ValueError) as exc:
        raise CliError(f"{path}: invalid {model_type} config: {exc}") from exc


def _hf_class(transformers, config):
    """The config's ``architectures[0]`` class when it is a transformers model class, else ``AutoModel``'s."""
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs and isinstance(archs[0], str) else ""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    if name:
        log.warning("hf: architecture %r is not a transformers model class; using AutoModel", name)
    return lambda cfg: transformers.AutoModel.from_config(cfg)


def _hf_inputs(model, config, shape: tuple[int, ...] | None) -> dict:
    import torch

    params = _inspect.signature(model.forward).parameters
    gen = torch.Generator().manual_seed(0)
    if "pixel_values" in params and "input_ids" not in params:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        default = (1, getattr(config, "num_channels", 3), size, size)
        return {"pixel_values": torch.randn(*(shape or default), generator=gen)}
    shape = shape or DEFAULT_TEXT_SHAPE
    if len(shape) != 2:
        raise CliError(f"--input-shape for a text model is batch,sequence (input_ids), got {','.join(map(str, shape))}")
    vocab = getattr(config, "vocab_size", None) or 100
    ids = torch.randint(0, vocab, shape, generator=gen)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = ids.clone()
    return inputs


def build(spec: str, input_shape: tuple[int, ...] | None = None) -> Built:
    """The module and example inputs of ``--model spec`` (``input_shape`` None: the source's default)."""
    source, sep, rest = spec.partition(":")
    if not sep or source not in MODEL_SOURCES:
        raise CliError(
            f"--model must be <source>:<name> with source in {', '.join(MODEL_SOURCES.names())}; got '{spec}'"
        )
    return MODEL_SOURCES.get(source)(rest, input_shape)


def build_model(spec: str):
    """The module of ``--model spec`` (random weights)."""
    return build(spec).model


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{text}'") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{text}'")
    return shape


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CliError(f"{message} (see '{self.prog} --help')")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsifx", description="Sparsify models with recipes, export and inspect them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="apply a recipe to a model and print the report")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument(
        "--model",
        required=True,
        help="torchvision:<name>, timm:<name>, hf:<model type or config.json/dir>, "
        "or python:<module>:<callable> (random weights)",
    )
    run.add_argument(
        "--input-shape",
        type=parse_shape,
        help="e.g. 1,3,224,224 (default: 1,3,224,224; timm: the model's input size; hf text: 1,16)",
    )
    run.add_argument("--onnx", type=Path, help="write a verified ONNX file here")
    run.add_argument("--save", type=Path, help="save the sparsified module here (sparsifx.save)")
    run.add_argument(
        "--plot",
        type=Path,
        help="write a figure of per-layer params/density/MACs before and after (.png, .svg, .pdf; needs matplotlib)",
    )
    run.add_argument("--verify", action="store_true", help="check semantics-preserving passes numerically")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect = sub.add_parser("inspect", help="print parameters and non-zeros of an .onnx file or a saved module")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--input-shape", type=parse_shape, help="example input shape for FLOPs of a module")
    inspect.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow loading a torch.save'd module (runs code from the file; only for trusted files)",
    )
    inspect.add_argument("--plot", type=Path, help="write a figure of the module's per-layer params/density/MACs")
    inspect.add_argument("--json", action="store_true", help="print as JSON")
    bench = sub.add_parser("bench", help="latency/throughput of the sparse runtime beside onnxruntime dense")
    bench.add_argument("target", help="an .onnx file, or a model source (torchvision:resnet50) with --sparsity")
    bench.add_argument("--sparsity", type=float, help="prune a model source to this sparsity first (e.g. 0.9)")
    bench.add_argument("--batch", type=parse_shape, default=(1,), help="batch sizes, e.g. 1,16 (default 1)")
    bench.add_argument("--threads", type=parse_shape, default=(1,), help="thread counts, e.g. 1,2 (default 1)")
    bench.add_argument("--reps", type=int, default=20, help="timed runs per engine and cell (default 20)")
    bench.add_argument("--input-shape", type=parse_shape, help="input shape where the file or source needs one")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def _check_plot_path(path: Path | None) -> None:
    """Fail before the long work: a missing directory, matplotlib or an unknown format is known up front."""
    if path is None:
        return
    if not path.parent.is_dir():
        raise CliError(f"--plot: directory {path.parent} does not exist")
    from .plot import PlotError, check_target

    try:
        check_target(path)
    except PlotError as exc:
        raise CliError(f"--plot: {exc}") from exc


class _Steps:
    """A bar over the named steps of a command (silent unless stderr is a terminal, see ``sparsifx.progress``)."""

    def __init__(self, names: list[str], desc: str):
        self.bar = progress(total=len(names), desc=desc, unit="step")
        self.started = False

    def next(self, name: str) -> None:
        self.bar.update(int(self.started))
        self.started = True
        self.bar.set_postfix_str(name)

    def say(self, text: str, file=None) -> None:
        self.bar.clear()
        print(text, file=file or sys.stdout)

    def close(self, done: bool) -> None:
        if done:
            self.bar.update(int(self.started))
        self.bar.close()


def cmd_run(args) -> int:
    from .api import sparsify
    from .recipe import Recipe
    from .reporting import report

    recipe_path = Path(args.recipe)
    if not recipe_path.is_file():
        raise CliError(f"recipe file not found: {recipe_path}")
    recipe = Recipe.load(recipe_path)
    _check_plot_path(args.plot)
    outputs = [name for name in ("onnx", "save", "plot") if getattr(args, name)]
    steps = _Steps(["build model", "sparsify", "report", *outputs], "sparsifx run")
    done = False
    try:
        steps.next("build model")
        built = build(args.model, args.input_shape)
        before = report(built.model, built.inputs) if args.plot else None
        steps.next("sparsify")
        gm = sparsify(
            built.model,
            recipe,
            example_inputs=built.inputs,
            verify=args.verify,
            progress=len(recipe.stages) > 1 and progress_enabled(),
        )
        steps.next("report")
        rep = report(gm, built.inputs)
        steps.say(json.dumps(rep.to_dict(), indent=1) if args.json else str(rep))
        _write_outputs(args, gm, built, rep, before, steps, f"sparsifx: {args.model} + {recipe_path.name}")
        done = True
    finally:
        steps.close(done)
    return 0


def _write_outputs(args, gm, built: Built, rep, before, steps: _Steps, title: str) -> None:
    out = sys.stderr if args.json else sys.stdout
    if args.onnx:
        steps.next("onnx")
        from .backends import onnx_export

        info = onnx_export.export_onnx(gm, args.onnx, built.inputs, **built.onnx_kwargs)
        steps.say(
            f"wrote {args.onnx} ({info.file_bytes / 1e6:.2f} MB, {info.exporter} exporter; "
            f"onnxruntime matches torch, max abs error {info.max_abs:.2e})",
            out,
        )
    if args.save:
        steps.next("save")
        _serialization().save(gm, args.save)
        steps.say(f"wrote {args.save}", out)
    if args.plot:
        steps.next("plot")
        rep.plot(args.plot, before=before, title=title)
        steps.say(f"wrote {args.plot}", out)


def _serialization():
    try:
        return importlib.import_module("sparsifx.serialization")
    except ImportError as exc:
        raise CliError(
            f"saving and loading modules needs sparsifx.serialization, which is not available: {exc}"
        ) from exc


def cmd_inspect(args) -> int:
    path: Path = args.file
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    if args.plot and path.suffix == ".onnx":
        raise CliError(
            "--plot draws the report of a saved module; an .onnx file has no layers to report "
            "(inspect the module before export, or run 'sparsifx run ... --plot')"
        )
    _check_plot_path(args.plot)
    if path.suffix == ".onnx":
        from .backends.onnx_export import inspect_onnx

        data = inspect_onnx(path)
        print(json.dumps(data, indent=1) if args.json else _format_onnx(data))
        return 0
    module = _load_module(path, args.unsafe_pickle)
    import torch

    from .reporting import report

    inputs = (torch.randn(*args.input_shape),) if args.input_shape else None
    rep = report(module, inputs)
    rejected = next((n for n in rep.notes if n.startswith("no MACs/FLOPs:")), None)
    if inputs is not None and rejected:  # the user asked for FLOPs at this shape: not silently without them
        raise CliError(f"--input-shape {','.join(map(str, args.input_shape))}: {rejected}")
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep)
    if args.plot:
        rep.plot(args.plot, title=f"sparsifx: {path.name}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _load_module(path: Path, unsafe_pickle: bool):
    import torch

    try:
        return _serialization().load(path)
    except CliError:
        raise
    except Exception as exc:  # not a sparsifx file: the loader refuses it with its own error
        if not unsafe_pickle:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CliError(
                f"{path} is not a module saved by sparsifx.save ({first}); for a torch.save'd module "
                "you trust, pass --unsafe-pickle"
            ) from exc
    try:
        module = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # unpickling raises many types
        raise CliError(f"cannot load {path} with torch.load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise CliError(f"{path} holds a {type(module).__name__}, not a torch.nn.Module")
    return module


def _format_onnx(data: dict) -> str:
    rows = [
        (
            i["name"],
            "x".join(map(str, i["shape"])) or "scalar",
            i["kind"],
            f"{i['params']:,}",
            f"{i['nonzeros']:,}",
            f"{i['sparsity']:.1%}",
        )
        for i in data["initializers"]
    ]
    head = ("initializer", "shape", "kind", "params", "nonzeros", "sparsity")
    t = data["total"]
    total = ("total", "", "", f"{t['params']:,}", f"{t['nonzeros']:,}", f"{t['sparsity']:.1%}")
    widths = [max(len(r[i]) for r in [head, total, *rows]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "-" * len(fmt(head))
    return "\n".join(
        [
            f"{data['file']}: opset {data['opset']}, {data['nodes']} nodes, {data['file_bytes'] / 1e6:.2f} MB on disk",
            fmt(head),
            rule,
            *map(fmt, rows),
            rule,
            fmt(total),
        ]
    )


def cmd_bench(args) -> int:
    from .bench import HEADER, as_dicts, bench

    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise CliError("--sparsity must be in [0, 1)")
    if args.reps < 1:
        raise CliError("--reps must be at least 1")
    if not args.json:
        print(HEADER)
    rows = bench(
        args.target,
        batches=args.batch,
        threads=args.threads,
        reps=args.reps,
        sparsity=args.sparsity,
        input_shape=args.input_shape,
        progress=None if args.json else print,
    )
    if args.json:
        print(json.dumps(as_dicts(rows), indent=1))
    return 0


COMMANDS = {"run": cmd_run, "inspect": cmd_inspect, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="sparsifx: %(levelname)s: %(message)s"
        )
        return COMMANDS[args.command](args)
    except SparsifxError as exc:
        print(f"sparsifx: error: {_one_line(exc)[:500]}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, CliError) else EXIT_ERROR
    except KeyboardInterrupt:
        print("sparsifx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI's contract: one line and a non-zero exit, whatever failed underneath
        log.debug("unexpected error", exc_info=True)
        print(f"sparsifx: error: {type(exc).__name__}: {_one_line(exc)[:500]}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
