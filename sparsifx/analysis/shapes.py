"""Analysis ``shapes``: ``node.meta["tensor_meta"]`` (shape, dtype, strides) of every node, from one run of the
example inputs. The one implementation of shape propagation (``sparsifx.tracing.record_shapes``,
``sparsifx.shape_prop`` and ``sparsifx.passes.analysis.shapes`` re-export it).

``record_shapes`` runs the model once only to learn every node's shape, dtype and strides. In a real
forward almost all the time goes to convolutions, linears and matmuls, although only their output
shapes matter. ``HeavyOpsOnMeta`` gives Conv1d/2d/3d and Linear modules their output shape by formula
and evaluates the functional matmuls and convs on the meta device (torch's shape functions), then passes
zeros of that shape and memory format on; every other op runs for real. Values after a heavy op are
therefore not the model's, but nothing recorded depends on them (``tests/test_shape_prop.py`` checks
the records against a real run on torchvision models). A functional op without a meta kernel runs for
real; ``record_shapes`` reruns everything for real if an op rejects the zeros.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ExampleInputError, PreconditionError
from ..meta_keys import NN_MODULE_STACK, TENSOR_META
from ..module_utils import eval_mode
from . import register_analysis

log = logging.getLogger(__name__)


def _accepts(m: nn.Module, x: torch.Tensor, ranks: range, size: int) -> None:
    """Raise where the real layer would reject ``x`` (rank, feature/channel count, dtype, device): the formula
    alone would record shapes for inputs the model cannot run, and ``record_shapes`` reruns for real on error."""
    w = m.weight
    dim = -1 if isinstance(m, nn.Linear) else -len(m.kernel_size) - 1
    if x.dim() not in ranks or x.shape[dim] != size or x.dtype != w.dtype or x.device != w.device:
        raise RuntimeError(f"{type(m).__name__} cannot take an input of shape {tuple(x.shape)} ({x.dtype})")


def _conv_shape(m: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    nd = len(m.kernel_size)
    _accepts(m, x, range(nd + 1, nd + 3), m.in_channels)
    spatial = x.shape[-nd:]
    if m.padding == "same":
        return (*x.shape[: -nd - 1], m.out_channels, *spatial)
    pad = (0,) * nd if m.padding == "valid" else m.padding
    out = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(spatial, pad, m.dilation, m.kernel_size, m.stride)
    ]
    if min(out) < 1:
        raise RuntimeError(f"{type(m).__name__}: input {tuple(x.shape)} is smaller than its kernel")
    return (*x.shape[: -nd - 1], m.out_channels, *out)


def _linear_shape(m: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    _accepts(m, x, range(1, x.dim() + 1), m.in_features)
    return (*x.shape[:-1], m.out_features)


# module type (exact: a subclass may override forward) -> output shape from the module and its input
HEAVY_MODULES: dict[type, Callable[[nn.Module, torch.Tensor], tuple[int, ...]]] = {
    nn.Conv1d: _conv_shape,
    nn.Conv2d: _conv_shape,
    nn.Conv3d: _conv_shape,
    nn.Linear: _linear_shape,
}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Zeros with the memory format a CPU/CUDA conv or linear gives for input ``like``."""
    fmt = _CHANNELS_LAST.get(len(shape))
    keep = (
        fmt is not None
        and like.dim() == len(shape)
        and like.is_contiguous(memory_format=fmt)
        and not like.is_contiguous()
    )
    out = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return out.contiguous(memory_format=fmt) if keep else out


HEAVY_FUNCTIONS: set[Any] = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    torch.matmul,
    operator.matmul,
    torch.bmm,
    torch.mm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
}


def _to_meta(x: Any) -> Any:
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return None


def _zeros_like_meta(out: Any, device: torch.device) -> Any:
    def zeros(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return torch.zeros_like(t, device=device)  # preserve_format: the meta strides carry over

    return tree_map(zeros, out)


class HeavyOpsOnMeta(ShapeProp):
    """``ShapeProp`` whose convolutions, linears and matmuls compute shapes only (see the module doc)."""

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        shape_of = HEAVY_MODULES.get(type(module))
        if shape_of is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return _zeros(shape_of(module, args[0]), args[0])
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in HEAVY_FUNCTIONS:
            out = self._on_meta(lambda a, k: target(*a, **k), args, kwargs)
            if out is not None:
                return out
        return super().call_function(target, args, kwargs)

    @staticmethod
    def _on_meta(fn, args: tuple, kwargs: dict) -> Any:
        device = _device_of(args, kwargs)
        if device is None:
            return None
        try:
            out = fn(tree_map(_to_meta, args), tree_map(_to_meta, kwargs))
        except (NotImplementedError, RuntimeError):  # no meta kernel: the caller runs the op for real
            return None
        return _zeros_like_meta(out, device)


class _RemembersFailure:
    """Interpreter mixin: ``failed_node`` is the node whose execution raised (``None`` while none has)."""

    failed_node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception:
            self.failed_node = self.failed_node or n
            raise


class _FastShapes(_RemembersFailure, HeavyOpsOnMeta):
    pass


class _RealShapes(_RemembersFailure, ShapeProp):
    pass


def record_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``gm`` once (eval, no grad) and store ``tensor_meta`` on every node.

    Heavy ops compute shapes only (``shape_prop.HeavyOpsOnMeta``); if that run raises (an op that
    rejects the zeros it then sees), the plain ``ShapeProp`` runs the model for real. Inputs the model
    rejects raise ``ExampleInputError`` naming their shapes and the node and module that rejected them.
    Every submodule's ``training`` flag is as it was afterwards (frozen BatchNorms stay frozen)."""
    fast, real = _FastShapes(gm), _RealShapes(gm)
    with eval_mode(gm), torch.no_grad():
        try:
            # ShapeProp prints the traceback of a failing node before it raises: the failure is reported below
            with contextlib.redirect_stderr(io.StringIO()):
                fast.propagate(*example_inputs)
            return
        except Exception as exc:  # noqa: BLE001 - retried for real below, and logged
            log.info(
                "shape propagation with heavy ops on meta failed (%s: %s); running the model for real",
                type(exc).__name__,
                exc,
            )
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                real.propagate(*example_inputs)
        except Exception as exc:
            raise _rejection(gm, example_inputs, real.failed_node, exc) from exc


def _describe_inputs(inputs: Sequence[Any]) -> str:
    parts = [
        f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor) else type(x).__name__
        for x in inputs
    ]
    return "[" + ", ".join(parts) + "]"


def _rejection(gm: fx.GraphModule, inputs: Sequence[Any], node: fx.Node | None, exc: Exception) -> ExampleInputError:
    """Which node and module rejected the example inputs, and torch's own reason (not ShapeProp's wrapper)."""
    cause = exc.__cause__ if exc.__cause__ is not None and "ShapeProp error" in str(exc) else exc
    text = str(cause).strip()
    reason = f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
    shapes, where, module = _describe_inputs(inputs), "the model", None
    if node is not None:
        stack = list(node.meta.get(NN_MODULE_STACK, {}).values())
        if node.op == "call_module":
            module = node.target
            where = f"module '{module}' ({type(gm.get_submodule(module)).__name__}, node '{node.name}')"
        else:
            module = stack[-1][0] if stack else None
            where = f"node '{node.name}' ({node.op} {_target_name(node)})"
            where += f" in module '{module}'" if module else ""
    return ExampleInputError(
        f"the example inputs {shapes} are rejected by {where}: {reason}. Pass inputs of the shapes and dtypes "
        "the model's forward accepts (as in model(*example_inputs)).",
        shapes,
        node.name if node is not None else None,
        module,
    )


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def shapes_present(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` has shapes where passes read them: on the output and on the input of every module call."""
    out = [n for n in gm.graph.nodes if n.op == "output"]
    if not out or TENSOR_META not in out[0].meta:
        return False
    return not any(
        n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node) and TENSOR_META not in n.args[0].meta
        for n in gm.graph.nodes
    )


@register_analysis(
    "shapes",
    key=TENSOR_META,
    present=shapes_present,
    remedy="pass example_inputs (sparsify(..., example_inputs=...), PassManager(..., example_inputs="
    "...)) or trace with them",
)
def shapes(gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> None:
    """Record ``node.meta["tensor_meta"]`` on every node by running ``example_inputs`` once."""
    if example_inputs is None:
        raise PreconditionError("the 'shapes' analysis needs example_inputs; pass example_inputs=(tensor,)")
    record_shapes(gm, example_inputs)
