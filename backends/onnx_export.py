"""Backend ``onnx``: export a module to ONNX, check it, and verify onnxruntime against torch.

``export_onnx(module, path, example_inputs)``:

1. exports a copy of ``module`` in eval mode (masked layers are baked first, ``weight * mask`` ->
   ``weight``, so the file holds the effective, zero-containing weights and no mask arithmetic);
2. runs ``onnx.checker``;
3. runs onnxruntime on the example inputs and, with ``dynamic_batch``, on a batch of a different
   size, and compares every output with torch (eval, no_grad) as ``|ort - torch| <= atol + rtol*|torch|``.

A failure at any step raises ``BackendError`` naming the step and, for a mismatch, the observed max
abs/rel error; nothing is written to ``path`` unless every step passed, and an unwritable or missing
destination directory raises ``ArtefactError``. Exporters (``exporter=``): ``"torchscript"``
(``torch.onnx.export(dynamo=False)``, fast, handles dynamic batch via ``dynamic_axes``), ``"dynamo"``
(torch.export-based) or ``"auto"`` (torchscript first; if it cannot export the model, e.g.
``adaptive_avg_pool2d`` with a non-divisor output size, the dynamo exporter is tried and a warning names the
first failure). The exporter used is logged and returned in the :class:`ExportResult`.

The options that shape the file are grouped in :class:`ExportOptions`, those of the onnxruntime comparison
in :class:`ParityCheck`; ``export_onnx`` keeps its keyword arguments and builds both from them, and
:func:`export_with_options` takes them directly. The module holds no state between calls.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparsifx.atomic_io import atomic_write
from sparsifx.errors import BackendError
from sparsifx.masking import bake_masks, masked_layers
from sparsifx.module_utils import eval_mode
from sparsifx.registry import Registry
from sparsifx.sparse_linear import densify_sparse_layers, sparse_layers

log = logging.getLogger(__name__)

EXPORTERS: Registry[Callable] = Registry("onnx exporter")
# protobuf cannot hold more than 2 GiB; above this many parameter bytes weights go to external data
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class ParityCheck:
    """How onnxruntime is compared with torch: ``|ort - torch| <= atol + rtol * |torch|`` on every output."""

    rtol: float = 1e-4
    atol: float = 1e-4


@dataclass(frozen=True)
class ExportOptions:
    """How ``export_onnx`` writes the file. ``parity=None`` skips the onnxruntime comparison (``verify=False``);
    ``onnx.checker`` always runs."""

    exporter: str = "auto"  # "auto", or a name in EXPORTERS ("torchscript", "dynamo")
    opset: int | None = None  # None: the exporter's default
    dynamic_batch: bool = True  # symbolic batch axis, verified on a second batch size
    sparse_weights: bool = False  # initializers rewritten as sparse tensors (sparse_onnx.to_sparse_initializers)
    parity: ParityCheck | None = ParityCheck()

    @property
    def verify(self) -> bool:
        return self.parity is not None


@dataclass(frozen=True)
class BatchCheck:
    """One onnxruntime-vs-torch comparison: the batch size and the observed max abs / rel error."""

    batch: int | None
    max_abs: float
    max_rel: float


@dataclass(frozen=True)
class ExportResult:
    """What one ``export_onnx`` call did. It stands for ``path`` where a path is expected (``os.PathLike``,
    ``str(result)``), so ``open(result)``, ``Path(result)`` and ``onnx.load(result)`` work as with the path
    ``export_onnx`` returned before; use ``result.path`` for ``Path`` methods."""

    path: Path
    exporter: str  # the exporter that wrote the file
    fallback_reason: str = ""  # why earlier exporters of "auto" failed ("" when the first one worked)
    opset: int | None = None  # the default-domain opset recorded in the file
    file_bytes: int = 0  # size on disk, external data included
    checks: tuple[BatchCheck, ...] = ()  # one per verified batch (empty with verify=False)

    @property
    def max_abs(self) -> float | None:
        return max((c.max_abs for c in self.checks), default=None)

    @property
    def max_rel(self) -> float | None:
        return max((c.max_rel for c in self.checks), default=None)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _names(example_inputs: Sequence[Any], n_out: int) -> tuple[list[str], list[str]]:
    return [f"input_{i}" for i in range(len(example_inputs))], [f"output_{i}" for i in range(n_out)]


@EXPORTERS.register("torchscript")
def _export_torchscript(module, inputs, path, dynamic_batch, opset, n_out):
    """``path``: a file path, or a binary file object (``OrtGraph`` exports into memory)."""
    in_names, out_names = _names(inputs, n_out)
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns about its own deprecation
        torch.onnx.export(
            module,
            tuple(inputs),
            path if hasattr(path, "write") else str(path),
            dynamo=False,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )


@EXPORTERS.register("dynamo")
def _export_dynamo(module, inputs, path, dynamic_batch, opset, n_out):
    in_names, out_names = _names(inputs, n_out)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs),
            str(path),
            dynamo=True,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=shapes,
            opset_version=opset,
            external_data=big,
            verbose=False,
        )


AUTO_ORDER = ("torchscript", "dynamo")


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _run_torch(module: torch.nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _flat_outputs(module(*inputs))


def _other_batch(inputs: Sequence[Any]) -> tuple:
    """The example inputs with batch size ``b + 2``: random floats of similar scale, resampled ints."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out.append(x)
            continue
        b = x.shape[0]
        shape = (b + 2, *x.shape[1:])
        if x.is_floating_point():
            scale = float(x.float().std()) if x.numel() > 1 else 1.0
            out.append((torch.randn(shape, generator=gen) * (scale or 1.0) + float(x.float().mean())).to(x.dtype))
        else:
            idx = torch.randint(0, b, (b + 2,), generator=gen)
            out.append(x[idx])
    return tuple(out)


def compare(actual: Sequence[Any], expected: Sequence[torch.Tensor], rtol: float, atol: float) -> dict:
    """Max abs/rel error between onnxruntime outputs and torch outputs, and whether they are close."""
    if len(actual) != len(expected):
        return {
            "ok": False,
            "max_abs": float("inf"),
            "max_rel": float("inf"),
            "detail": f"onnxruntime returned {len(actual)} outputs, torch {len(expected)}",
        }
    max_abs = max_rel = 0.0
    ok, detail = True, ""
    for i, (a, e) in enumerate(zip(actual, expected)):
        a = torch.as_tensor(a)
        e = e.detach().cpu()
        if tuple(a.shape) != tuple(e.shape):
            return {
                "ok": False,
                "max_abs": float("inf"),
                "max_rel": float("inf"),
                "detail": f"output {i}: shape {tuple(a.shape)} != torch {tuple(e.shape)}",
            }
        if e.numel() == 0:
            continue
        a64, e64 = a.double(), e.double()
        diff = (a64 - e64).abs()
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / e64.abs().clamp_min(atol)).max()))
        if not bool((diff <= atol + rtol * e64.abs()).all()) or bool(torch.isnan(a64).ne(torch.isnan(e64)).any()):
            ok, detail = False, detail or f"output {i} differs"
    return {"ok": ok, "max_abs": max_abs, "max_rel": max_rel, "detail": detail}


def _check_model(path: Path, shown: Path | None = None) -> None:
    """``onnx.checker`` on ``path``; errors name ``shown`` (the destination of a temporary file)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise BackendError(f"onnx.checker rejected {shown or path}: {type(exc).__name__}: {exc}") from exc


def _verify(
    module, file: Path, batches: list[tuple], rtol: float, atol: float, path: Path | None = None
) -> list[BatchCheck]:
    """onnxruntime on ``file`` vs torch on each batch; errors name ``path`` (default: ``file``)."""
    import onnxruntime as ort

    path = path or file
    try:
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(f"onnxruntime cannot load {path}: {type(exc).__name__}: {exc}") from exc
    names = [i.name for i in session.get_inputs()]
    checks = []
    for inputs in batches:
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, tensors)}
        batch = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else None
        try:
            got = session.run(None, feed)
        except Exception as exc:
            raise BackendError(
                f"onnxruntime failed on {path} with batch size {batch}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            expected = _run_torch(module, inputs)
        except Exception as exc:
            raise BackendError(
                f"the module fails on the verification batch of size {batch}: {type(exc).__name__}: {exc}"
            ) from exc
        result = compare(got, expected, rtol, atol)
        checks.append(BatchCheck(batch, result["max_abs"], result["max_rel"]))
        if not result["ok"]:
            raise BackendError(
                f"onnxruntime output does not match torch for batch size {batch} ({path}): "
                f"{result['detail']}; max abs error {result['max_abs']:.3g}, max rel error "
                f"{result['max_rel']:.3g} (rtol={rtol}, atol={atol})"
            )
    return checks


def _interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` carries a KeyboardInterrupt: in its cause/context chain, or re-raised by native code as a
    ``RuntimeError`` whose text names it (a Python callback interrupted inside a C++ pass)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, RuntimeError) and "KeyboardInterrupt" in str(exc)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _export(module, inputs, path: Path, exporter: str, dynamic_batch: bool, opset, n_out: int) -> tuple[str, str]:
    order = AUTO_ORDER if exporter == "auto" else (exporter,)
    failures = []
    for name in order:
        try:
            EXPORTERS.get(name)(module, inputs, path, dynamic_batch, opset, n_out)
        except Exception as exc:  # exporters raise many types; all become one BackendError below
            if _interrupted(exc):  # never fall back to the next exporter past a Ctrl-C
                raise KeyboardInterrupt(f"ONNX export interrupted in the {name} exporter") from exc
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            failures.append(f"{name} exporter: {type(exc).__name__}: {first}")
            log.warning(
                "ONNX %s exporter failed (%s)%s",
                name,
                failures[-1],
                "; trying the next exporter" if name != order[-1] else "",
            )
            continue
        return name, "; ".join(failures)
    raise BackendError(f"ONNX export of {type(module).__name__} failed: " + " | ".join(failures))


def export_onnx(
    module: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    dynamic_batch: bool = True,
    verify: bool = True,
    opset: int | None = None,
    sparse_weights: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    exporter: str = "auto",
) -> ExportResult:
    """Export ``module`` to ``path`` (ONNX), check it and verify it with onnxruntime; returns an
    :class:`ExportResult` (the path, the exporter used, opset, size on disk and one :class:`BatchCheck` per
    verified batch). The keyword arguments build an :class:`ExportOptions` (``verify``, ``rtol`` and ``atol``
    its :class:`ParityCheck`) for :func:`export_with_options`.

    The export is written to a temporary file beside ``path`` and renamed over it only after the checks
    pass (``sparsifx.atomic_io.atomic_write``): on any failure an existing file at ``path`` is left as it
    was. The directory must exist (``ArtefactError`` otherwise). Every submodule's ``training`` flag is
    restored afterwards (``eval_mode``).

    ``sparse_weights=True`` rewrites initializers as sparse tensors with
    ``sparsifx.backends.sparse_onnx.to_sparse_initializers`` before verification.
    """
    options = ExportOptions(
        exporter=exporter,
        opset=opset,
        dynamic_batch=dynamic_batch,
        sparse_weights=sparse_weights,
        parity=ParityCheck(rtol, atol) if verify else None,
    )
    return export_with_options(module, path, example_inputs, options)


def export_with_options(
    module: torch.nn.Module, path: str | os.PathLike, example_inputs: Any, options: ExportOptions = ExportOptions()
) -> ExportResult:
    """``export_onnx`` with its options as one :class:`ExportOptions`."""
    exporter, dynamic_batch, parity = options.exporter, options.dynamic_batch, options.parity
    if exporter != "auto" and exporter not in EXPORTERS:
        raise BackendError(f"unknown ONNX exporter '{exporter}'; choose auto, {', '.join(EXPORTERS.names())}")
    if not isinstance(module, torch.nn.Module):
        raise BackendError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not any(isinstance(x, torch.Tensor) for x in inputs):
        raise BackendError("export_onnx needs at least one example input tensor")
    path = Path(path)
    if any(True for _ in masked_layers(module)) or any(True for _ in sparse_layers(module)):
        module = copy.deepcopy(module)
        log.info(
            "baked %d masked and %d sparse-storage layers into dense weights for export",
            bake_masks(module),
            densify_sparse_layers(module),
        )
    facts: dict[str, Any] = {}  # filled by write and check, which atomic_write calls in turn
    with eval_mode(module):
        try:
            n_out = len(_run_torch(module, inputs))
        except Exception as exc:
            raise BackendError(f"the module fails on the example inputs: {type(exc).__name__}: {exc}") from exc
        # grad stays enabled: under no_grad, MultiheadAttention takes a fused fast path the exporters lack;
        # a batch of 1 would be specialised by the exporters, so dynamic export traces a batch of b + 2
        export_inputs = _other_batch(inputs) if dynamic_batch else inputs

        def write(tmp: Path) -> None:
            facts["exporter"], facts["fallback_reason"] = _export(
                module, export_inputs, tmp, exporter, dynamic_batch, options.opset, n_out
            )
            log.info("exported %s with the %s exporter", path, facts["exporter"])
            if options.sparse_weights:
                _sparsify_file(tmp, path)

        def check(tmp: Path) -> None:
            _check_model(tmp, path)
            facts["opset"], facts["file_bytes"] = _file_facts(tmp)
            if parity is not None:
                batches = [inputs] + ([export_inputs] if dynamic_batch else [])
                facts["checks"] = tuple(_verify(module, tmp, batches, parity.rtol, parity.atol, path))

        atomic_write(path, write, check)  # the file at ``path`` changes only once export and checks passed
    return ExportResult(
        path, facts["exporter"], facts["fallback_reason"], facts["opset"], facts["file_bytes"], facts.get("checks", ())
    )


def _file_facts(path: Path) -> tuple[int | None, int]:
    """The default-domain opset of the ONNX file at ``path`` and its size on disk with the external-data files
    it names beside it (the external data itself is not read)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    files = {path.parent / str(ExternalDataInfo(t).location) for t in model.graph.initializer if uses_external_data(t)}
    return opset, path.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())


def _sparsify_file(path: Path, shown: Path | None = None) -> None:
    """Rewrite ``path``'s initializers as sparse tensors in place; errors name ``shown`` (default: ``path``)."""
    try:
        from sparsifx.backends.sparse_onnx import to_sparse_initializers
    except ImportError as exc:
        raise BackendError(
            "sparse_weights=True needs sparsifx.backends.sparse_onnx.to_sparse_initializers, "
            f"which is not available: {exc}"
        ) from exc
    import onnx

    model = onnx.load(str(path))
    try:
        model = to_sparse_initializers(model)
    except Exception as exc:
        raise BackendError(
            f"converting initializers of {shown or path} to sparse failed: {type(exc).__name__}: {exc}"
        ) from exc
    onnx.save(model, str(path))


MAX_INSPECT_BYTES = 8 << 30  # an ONNX file (with its external data) that inspect_onnx reads


def _external_file(path: Path, tensor) -> Path | None:
    """The external-data file of ``tensor``, checked to be a regular file inside ``path``'s folder."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if not uses_external_data(tensor):
        return None
    info = ExternalDataInfo(tensor)
    location = Path(str(info.location))
    target = (path.parent / location).resolve()
    if (
        location.is_absolute()
        or ".." in location.parts
        or path.parent.resolve() not in target.parents
        or not target.is_file()
    ):
        raise BackendError(
            f"ONNX file {path}: tensor '{tensor.name}' points at external data "
            f"'{str(info.location)[:80]}' outside the model's folder or not a regular file"
        )
    size = target.stat().st_size
    offset, length = int(info.offset or 0), info.length
    if offset < 0 or offset > size or (length is not None and (length < 0 or offset + int(length) > size)):
        raise BackendError(f"ONNX file {path}: tensor '{tensor.name}' external data range lies outside its file")
    return target


def _tensor_array(path: Path, tensor):
    from onnx import numpy_helper

    _external_file(path, tensor)
    try:
        return numpy_helper.to_array(tensor, base_dir=str(path.parent))
    except Exception as exc:  # malformed tensor data raises many types
        raise BackendError(f"ONNX file {path}: cannot read tensor '{tensor.name}': {type(exc).__name__}") from exc


def inspect_onnx(path: str | os.PathLike) -> dict:
    """Per-initializer (dense and sparse) parameters and non-zeros of an ONNX file, totals and size on disk.

    The file is untrusted: it must be under ``MAX_INSPECT_BYTES``; external data must be regular files inside
    the model's folder (no absolute paths, no ``..``), with ranges inside them; any malformed part raises
    :class:`BackendError`.
    """
    import math

    import numpy as np
    import onnx

    path = Path(path)
    try:
        if path.stat().st_size > MAX_INSPECT_BYTES:
            raise BackendError(f"ONNX file {path} is larger than the inspect limit of {MAX_INSPECT_BYTES} bytes")
        model = onnx.load(str(path), load_external_data=False)
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"cannot read ONNX file {path}: {type(exc).__name__}: {exc}") from exc
    rows = []
    for init in model.graph.initializer:
        arr = _tensor_array(path, init)
        rows.append(
            {
                "name": init.name,
                "shape": list(arr.shape),
                "kind": "dense",
                "params": int(arr.size),
                "nonzeros": int(np.count_nonzero(arr)),
            }
        )
    for sparse in model.graph.sparse_initializer:
        values = _tensor_array(path, sparse.values)
        dims = [int(d) for d in sparse.dims]
        if any(d < 0 for d in dims):
            raise BackendError(f"ONNX file {path}: sparse initializer '{sparse.values.name}' has negative dims")
        rows.append(
            {
                "name": sparse.values.name,
                "shape": dims,
                "kind": "sparse",
                "params": math.prod(dims),
                "nonzeros": int(np.count_nonzero(values)),
            }
        )
    for row in rows:
        row["sparsity"] = 1 - row["nonzeros"] / row["params"] if row["params"] else 0.0
    params, nonzeros = sum(r["params"] for r in rows), sum(r["nonzeros"] for r in rows)
    external = {
        _external_file(path, t) for t in [*model.graph.initializer, *(s.values for s in model.graph.sparse_initializer)]
    }
    size = path.stat().st_size + sum(f.stat().st_size for f in external - {None})
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "file": str(path),
        "file_bytes": size,
        "opset": opset,
        "nodes": len(model.graph.node),
        "initializers": rows,
        "total": {"params": params, "nonzeros": nonzeros, "sparsity": 1 - nonzeros / params if params else 0.0},
    }
