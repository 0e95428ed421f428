"""``lower``'s last step: the lowered model timed against the whole dense model run by onnxruntime.

``lower`` measures its choices one layer at a time. What that leaves out (Python dispatch between layers,
onnxruntime's fusions across layers, a thread pool woken per layer) can make a model whose layers each won slower
than onnxruntime running the whole dense graph, e.g. mobilenet_v2 at 80% sparsity. This step times both on the
example inputs and keeps the faster, so that lowering never leaves a model slower than onnxruntime dense: when
onnxruntime wins, the graph becomes ``placeholders -> OrtGraph -> output``. ``lower_summary["whole_model"]`` says
which was kept, with both times, or why the comparison could not run.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparsifx.module_utils import eval_mode

ORT_GRAPH_NAME = "onnxruntime_graph"
TOLERANCE = dict(rtol=1e-3, atol=1e-3)


def _as_tuple(out):
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def flat_io_reason(gm: fx.GraphModule) -> str | None:
    """Why ``gm`` cannot be rewritten to ``placeholders -> one module -> output`` (None: it can)."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        return "the graph has structured (pytree) inputs or outputs"
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not (isinstance(out, fx.Node) or (isinstance(out, (tuple, list)) and all(isinstance(o, fx.Node) for o in out))):
        return "the model's output is not a tensor or a flat tuple of tensors"
    return None


def _skip_reason(gm: fx.GraphModule, inputs) -> str | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if inputs is None:
        return "no example inputs to time the model on"
    if len(inputs) != len(placeholders) or not all(
        isinstance(x, torch.Tensor) and x.dtype == torch.float32 for x in inputs
    ):
        return "the model's inputs are not all float32 tensors given as example inputs"
    return flat_io_reason(gm)


def ort_candidate(twin: fx.GraphModule, inputs):
    """``(OrtGraph, None)`` of the dense twin, or ``(None, reason)`` when it cannot be built."""
    from sparsifx.backends.ort_graph import OrtGraph

    reason = _skip_reason(twin, inputs)
    if reason is not None:
        return None, reason
    try:
        return OrtGraph.from_module(twin, tuple(inputs)).eval(), None
    except Exception as exc:  # an export failure or an op outside the allow-list: the comparison is skipped, named
        return None, f"the dense model could not be run by onnxruntime: {type(exc).__name__}: {str(exc)[:200]}"


def replace_with(gm: fx.GraphModule, module: torch.nn.Module, name: str = ORT_GRAPH_NAME) -> None:
    """Rewrite ``gm`` in place to ``placeholders -> module -> output`` (same inputs, same output structure),
    ``module`` registered as ``name``."""
    old_output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    graph = fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    gm.add_submodule(name, module)
    call = graph.call_module(name, tuple(env.values()))
    if isinstance(old_output, fx.Node):
        graph.output(call)
    else:
        items = [graph.call_function(operator.getitem, (call, i)) for i in range(len(old_output))]
        graph.output(type(old_output)(items))
    gm.graph = graph
    gm.delete_all_unused_submodules()
    gm.recompile()


def keep_faster(gm: fx.GraphModule, twin: fx.GraphModule, inputs, reps: int, margin: float = 1.0) -> dict:
    """Time ``gm`` (lowered) and onnxruntime on the dense ``twin``; rewrite ``gm`` to the latter unless the lowered
    model is ``margin`` times faster (a near tie goes to onnxruntime: its speed relative to onnxruntime dense is 1
    whatever the machine's load, while the sparse kernels' ratio moves with it)."""
    from sparsifx.backends.cost_model import median_ms

    ort, reason = ort_candidate(twin, inputs)
    if ort is None:
        return {"kept": "lowered", "skipped": reason}
    inputs = tuple(inputs)
    with eval_mode(gm), torch.inference_mode():
        try:
            torch.testing.assert_close(tuple(_as_tuple(ort(*inputs))), tuple(_as_tuple(twin(*inputs))), **TOLERANCE)
        except AssertionError as exc:
            return {"kept": "lowered", "skipped": f"onnxruntime's output differs from torch's: {str(exc)[:200]}"}
        ms = median_ms({"lowered": lambda: gm(*inputs), "onnxruntime": lambda: ort(*inputs)}, reps=reps)
    kept = "lowered" if ms["lowered"] * margin < ms["onnxruntime"] else "onnxruntime"
    if kept == "onnxruntime":
        replace_with(gm, ort.train(gm.training))
    return {"kept": kept, "lowered_ms": round(ms["lowered"], 3), "onnxruntime_ms": round(ms["onnxruntime"], 3)}
