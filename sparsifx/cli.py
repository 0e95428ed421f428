"""Console script ``sparsifx``.

    sparsifx run RECIPE --model torchvision:resnet18 [--input-shape 1,3,224,224] [--onnx out.onnx]
                 [--verify] [--save out.pt] [--json]
    sparsifx inspect FILE [--input-shape 1,3,224,224] [--unsafe-pickle] [--json]

``run`` applies a recipe (YAML file) to a model (``torchvision:<name>`` with random weights, or
``python:<module>:<callable>`` returning an ``nn.Module``), prints the report and optionally writes a
verified ONNX file (``--onnx``) and a saved module (``--save``, ``sparsifx.save``). ``--verify`` checks
every semantics-preserving pass numerically; the ONNX file is always checked against onnxruntime.
``inspect`` prints per-initializer parameters and non-zeros of an ``.onnx`` file, or the report of a
module saved by ``sparsifx.save`` (a plain ``torch.save``'d module only with ``--unsafe-pickle``: it
runs arbitrary code from the file). Errors are one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import SparsifxError
from .registry import Registry

log = logging.getLogger(__name__)

MODEL_SOURCES: Registry = Registry("model source")
EXIT_USAGE, EXIT_ERROR = 2, 1


class CliError(SparsifxError):
    """A bad command-line argument or input file."""


@MODEL_SOURCES.register("torchvision")
def _torchvision_model(name: str):
    try:
        import torchvision
    except ImportError as exc:
        raise CliError("torchvision is not installed (pip install sparsifx[test])") from exc
    names = torchvision.models.list_models()
    if name not in names:
        raise CliError(f"unknown torchvision model '{name}'; e.g. {', '.join(names[:5])}, ...")
    return torchvision.models.get_model(name, weights=None)


@MODEL_SOURCES.register("python")
def _python_model(spec: str):
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise CliError(f"python model spec must be python:<module>:<callable>, got 'python:{spec}'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot import {module_name}:{attr}: {exc}") from exc
    return factory()


def build_model(spec: str):
    source, sep, rest = spec.partition(":")
    if not sep or source not in MODEL_SOURCES:
        raise CliError(f"--model must be <source>:<name> with source in {', '.join(MODEL_SOURCES.names())}; "
                       f"got '{spec}'")
    return MODEL_SOURCES.get(source)(rest)


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
    run.add_argument("--model", required=True, help="torchvision:<name> or python:<module>:<callable>")
    run.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224), help="e.g. 1,3,224,224")
    run.add_argument("--onnx", type=Path, help="write a verified ONNX file here")
    run.add_argument("--save", type=Path, help="save the sparsified module here (sparsifx.save)")
    run.add_argument("--verify", action="store_true", help="check semantics-preserving passes numerically")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect = sub.add_parser("inspect", help="print parameters and non-zeros of an .onnx file or a saved module")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--input-shape", type=parse_shape, help="example input shape for FLOPs of a module")
    inspect.add_argument("--unsafe-pickle", action="store_true",
                         help="allow loading a torch.save'd module (runs code from the file; only for trusted files)")
    inspect.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def cmd_run(args) -> int:
    import torch
    from .api import sparsify
    from .recipe import Recipe
    from .report import report

    recipe_path = Path(args.recipe)
    if not recipe_path.is_file():
        raise CliError(f"recipe file not found: {recipe_path}")
    recipe = Recipe.load(recipe_path)
    model = build_model(args.model)
    x = torch.randn(*args.input_shape)
    gm = sparsify(model, recipe, example_inputs=(x,), verify=args.verify, progress=len(recipe.stages) > 1)
    rep = report(gm, (x,))
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep)
    if args.onnx:
        from .backends import onnx_export
        onnx_export.export_onnx(gm, args.onnx, (x,))
        info = onnx_export.LAST_EXPORT
        print(f"wrote {args.onnx} ({args.onnx.stat().st_size / 1e6:.2f} MB, {info.exporter} exporter; onnxruntime "
              f"matches torch, max abs error {info.max_abs:.2e})", file=sys.stderr if args.json else sys.stdout)
    if args.save:
        _serialization().save(gm, args.save)
        print(f"wrote {args.save}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _serialization():
    try:
        return importlib.import_module("sparsifx.serialization")
    except ImportError as exc:
        raise CliError(f"saving and loading modules needs sparsifx.serialization, which is not available: {exc}")


def cmd_inspect(args) -> int:
    path: Path = args.file
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    if path.suffix == ".onnx":
        from .backends.onnx_export import inspect_onnx
        data = inspect_onnx(path)
        print(json.dumps(data, indent=1) if args.json else _format_onnx(data))
        return 0
    module = _load_module(path, args.unsafe_pickle)
    import torch
    from .report import report
    inputs = (torch.randn(*args.input_shape),) if args.input_shape else None
    rep = report(module, inputs)
    rejected = next((n for n in rep.notes if n.startswith("no MACs/FLOPs:")), None)
    if inputs is not None and rejected:  # the user asked for FLOPs at this shape: not silently without them
        raise CliError(f"--input-shape {','.join(map(str, args.input_shape))}: {rejected}")
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep)
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
            raise CliError(f"{path} is not a module saved by sparsifx.save ({first}); for a torch.save'd module "
                           "you trust, pass --unsafe-pickle") from exc
    try:
        module = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # unpickling raises many types
        raise CliError(f"cannot load {path} with torch.load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise CliError(f"{path} holds a {type(module).__name__}, not a torch.nn.Module")
    return module


def _format_onnx(data: dict) -> str:
    rows = [(i["name"], "x".join(map(str, i["shape"])) or "scalar", i["kind"], f"{i['params']:,}",
             f"{i['nonzeros']:,}", f"{i['sparsity']:.1%}") for i in data["initializers"]]
    head = ("initializer", "shape", "kind", "params", "nonzeros", "sparsity")
    t = data["total"]
    total = ("total", "", "", f"{t['params']:,}", f"{t['nonzeros']:,}", f"{t['sparsity']:.1%}")
    widths = [max(len(r[i]) for r in [head, total, *rows]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    rule = "-" * len(fmt(head))
    return "\n".join([f"{data['file']}: opset {data['opset']}, {data['nodes']} nodes, "
                      f"{data['file_bytes'] / 1e6:.2f} MB on disk", fmt(head), rule, *map(fmt, rows), rule,
                      fmt(total)])


COMMANDS = {"run": cmd_run, "inspect": cmd_inspect}


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="sparsifx: %(levelname)s: %(message)s")
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
