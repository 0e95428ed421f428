"""Every ``gm.meta`` / ``node.meta`` key sparsifx reads or writes, with what it holds.

Passes and analyses hand results to each other only through these keys; a pass that needs one declares the
analysis that provides it (``PassBase.requires_analyses``) or checks it in ``requires`` (``PreconditionError``).
"""

from __future__ import annotations

# ---- node.meta -------------------------------------------------------------------------------------------
TENSOR_META = "tensor_meta"  # TensorMetadata (shape, dtype, strides) of the node's value: analysis 'shapes'
MACS = "macs"  # (MACs, density source) of the node's op: analysis 'macs' (analysis/costs.py)
NN_MODULE_STACK = "nn_module_stack"  # fx's {key: (module path, class)} of the modules the node ran inside
STACK_TRACE = "stack_trace"  # fx's source location of the node
VAL = "val"  # torch.export's fake tensor (or SymInt) of the node's value
TORCH_FN = "torch_fn"  # torch.export's (name, qualified name) of the torch function the node calls
HEAD_SPLIT = "head_split"  # True on a reshape that channel_prune's attention decomposition wrote

# ---- gm.meta: tracing ------------------------------------------------------------------------------------
EXAMPLE_INPUTS = "example_inputs"  # the inputs sparsify traced with; analyses run on them when a pass needs one
OPAQUE_LEAVES = "opaque_leaves"  # module paths tracing kept as leaves because they could not be traced
LEAF_TYPES = "leaf_types"  # module classes the user asked to keep as leaves (reused by retrace)
MODULE_CLASSES = "module_classes"  # {module path: [qualified class, *MRO names]} of the traced model

# ---- gm.meta: sparsify / the pass manager ----------------------------------------------------------------
HISTORY = "history"  # [PassRecord]: which passes ran, modified, verified
RECIPE = "recipe"  # the Recipe sparsify applied

# ---- gm.meta: the report hook ----------------------------------------------------------------------------
REPORT_EXTRA = "report_extra"  # {layer name: {column: value}} extra report columns a pass adds
LOWER_SUMMARY = "lower_summary"  # lower's model totals: executed vs dense MACs, layer-sum and measured speedups
REPORT_NOTES = "report_notes"  # [str]: notes a pass adds to the report
STORAGE_NOTES = "storage_notes"  # {layer name: why} layers a 'storage: sparse' stage left masked

# ---- gm.meta: channel pruning ----------------------------------------------------------------------------
CHANNEL_ANALYSIS = "channel_analysis"  # ChannelAnalysis (coupled channel groups): analysis 'channel_coupling'
CHANNEL_PLAN = "channel_plan"  # ChannelPlan channel_prune leaves for shrink (shrink consumes it)
CHANNEL_OUTCOME = "channel_outcome"  # PruneOutcome: requested vs achieved channel ratio
CHANNEL_BARRIERS = "channel_barriers"  # [{node, reason, channels}] ops that held channel groups whole
CHANNEL_REPORT = "channel_report"  # what shrink removed, kept and folded, and why
CHANNEL_HEAD_SPLITS = "channel_head_splits"  # during a heads analysis: {reshape node name: dims united in a head}

# ---- gm.meta: sparse training ----------------------------------------------------------------------------
SPARSE_CONTROLLER = "sparse_controller"  # the DST / SWAT controller that updates masks while training
SWAT_STATE = "swat"  # the swat pass's settings and per-layer sparsities

ALL = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, str)}
