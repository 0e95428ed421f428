"""Channel atoms, label tensors and the records the coupling analysis collects.

A *label tensor* stands for one activation: an int64 tensor with the activation's ndim whose entries are
*atom* ids (0 = ``FIXED``: not prunable). A dim of size 1 in the label means "the same label all along
that dim". Invariant after ``normalize``: at most one dim varies (the channel dim); other varying dims are
collapsed by *uniting* their atoms, which is always safe (pruned together) and keeps every tensor
rectangular after shrinking.

Atoms are created by producers (one per output channel of a conv/linear, shared across calls of the same
module) or passively for parameters read with ``get_attr``. Coupling is recorded as union edges; units
(channels pruned as one) are the connected components, computed once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

FIXED = 0


@dataclass
class Member:
    """A tensor dim sliced with the channels: ``getattr(owner, tensor)`` along ``dim``, labelled ``atoms``.

    ``role``: ``out`` (zeroed by channel_prune, sliced by shrink), ``aux`` (sliced only: running stats),
    ``in`` (a consumer's input dim: sliced only; the pruned input must be zero or a foldable constant).
    """

    owner: str
    tensor: str
    dim: int
    atoms: torch.Tensor
    role: str
    node: str


@dataclass
class Constraint:
    """``atoms`` split into ``blocks`` equal contiguous blocks must keep the same count per block; with
    ``droppable``, a block may also lose all its atoms (its conv then has fewer groups)."""

    atoms: torch.Tensor
    blocks: int
    node: str
    droppable: bool = False


@dataclass
class Check:
    """Pruned positions of input node ``src`` of ``node`` along ``dim``: ``fold`` into ``module`` or ``zero``."""

    node: str
    src: str
    dim: int
    atoms: torch.Tensor
    kind: str
    module: str | None = None


@dataclass
class Rewrite:
    """A graph node whose constant arguments depend on channel counts (``kind`` keys REWRITES)."""

    node: str
    kind: str
    data: dict = field(default_factory=dict)


class Tracker:
    """Collects atoms, union edges, members, constraints, checks, rewrites and barriers."""

    def __init__(self, streams: str = "exact"):
        self.streams = streams  # "approximate": channel-wide normalisations pass channels (streams.py)
        self.approximations: list[dict] = []  # {"node", "op", "reason", "atoms"} of each such normalisation
        self.n_atoms = 1
        self._space_chunks: list[torch.Tensor] = [torch.full((1,), -1, dtype=torch.long)]
        self._edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.spaces: list[str] = []
        self.members: list[Member] = []
        self.constraints: list[Constraint] = []
        self.checks: list[Check] = []
        self.rewrites: dict[str, Rewrite] = {}
        self.barriers: list[dict[str, str]] = []
        self.module_atoms: dict[str, torch.Tensor] = {}
        self.zero_nodes: set[str] = set()  # outputs exactly zero at pruned positions (see zeros.py)
        self.labels: dict[str, Any] = {}  # node name -> its (normalized) labels, for shape updates
        self.whole_reads: set[str] = set()  # get_attr nodes whose every reader slices each dim it uses
        self.fn_producers: dict[str, str] = {}  # producer module -> the weight of its functional layer

    # ---- atoms and edges -------------------------------------------------------------------------
    def fresh(self, n: int, space: str | None) -> torch.Tensor:
        """``n`` new atoms; ``space`` names the producer (``None``: passive parameter atoms)."""
        sid = -1
        if space is not None:
            sid = len(self.spaces)
            self.spaces.append(space)
        atoms = torch.arange(self.n_atoms, self.n_atoms + n, dtype=torch.long)
        self._space_chunks.append(torch.full((n,), sid, dtype=torch.long))
        self.n_atoms += n
        return atoms

    def producer_atoms(self, module: str, n: int) -> torch.Tensor:
        """Output atoms of ``module`` (the same atoms on every call of a shared module)."""
        if module not in self.module_atoms:
            self.module_atoms[module] = self.fresh(n, module)
        return self.module_atoms[module]

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        keep = a != b
        if bool(keep.any()):
            self._edges.append((a[keep].clone(), b[keep].clone()))

    def fix(self, labels: Any) -> None:
        """Make every atom in ``labels`` (a label tensor or nested tuple/list/dict of them) unprunable."""
        for t in tensor_leaves(labels):
            u = torch.unique(t)
            u = u[u != FIXED]
            if u.numel():
                self._edges.append((u, torch.zeros_like(u)))

    def set_role(self, node_name: str, role: str) -> None:
        """Give the members recorded for node ``node_name`` (a ``get_attr`` read) the role ``role``."""
        for m in self.members:
            if m.node == node_name:
                m.role = role

    def rewrite_node(self, node, kind: str, **data) -> None:
        self.rewrites[node.name] = Rewrite(node.name, kind, data)

    def barrier(self, node, reason: str, labels: Any) -> None:
        self.fix(labels)
        self.barriers.append({"node": node.name, "op": _describe(node), "reason": reason})

    def approximate(self, node, reason: str, labels: Any) -> bool:
        """A normalisation whose statistics span the channels of ``labels``: with ``streams="approximate"``
        they pass (recorded, True); otherwise a barrier (False)."""
        if self.streams != "approximate":
            self.barrier(node, f"{reason} (pruning is not exact)", labels)
            return False
        atoms = torch.cat([t.reshape(-1) for t in tensor_leaves(labels)] + [torch.zeros(0, dtype=torch.long)])
        self.approximations.append(
            {"node": node.name, "op": _describe(node), "reason": reason, "atoms": torch.unique(atoms[atoms != FIXED])}
        )
        return True

    # ---- label helpers ---------------------------------------------------------------------------
    def normalize(self, lab: torch.Tensor) -> torch.Tensor:
        """Compress constant dims, then collapse (unite) all varying dims but the last."""
        for d in range(lab.ndim):
            if lab.shape[d] > 1:
                first = lab.narrow(d, 0, 1)
                if bool((lab == first).all()):
                    lab = first
        vary = [d for d in range(lab.ndim) if lab.shape[d] > 1]
        for d in vary[:-1]:
            first = lab.narrow(d, 0, 1)
            self.union(lab, first)
            lab = first
        return lab.contiguous()

    def along(self, lab: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        """The atom vector along ``dim`` (length ``size``), uniting atoms along every other dim."""
        dim = dim % lab.ndim
        for d in range(lab.ndim):
            if d != dim and lab.shape[d] > 1:
                first = lab.narrow(d, 0, 1)
                self.union(lab, first)
                lab = first
        vec = lab.reshape(-1)
        return vec.expand(size).clone() if vec.numel() == 1 else vec.clone()

    def place(self, vec: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
        """A label tensor of ``ndim`` dims varying along ``dim`` with ``vec``."""
        shape = [1] * ndim
        shape[dim % ndim] = vec.numel()
        return self.normalize(vec.reshape(shape))

    # ---- results -----------------------------------------------------------------------------------
    def atom_space(self) -> torch.Tensor:
        return torch.cat(self._space_chunks)

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The union edges as two atom arrays ``a[i] - b[i]`` (``FIXED`` marks an atom held whole)."""
        if not self._edges:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return torch.cat([e[0] for e in self._edges]).numpy(), torch.cat([e[1] for e in self._edges]).numpy()

    def components(self) -> np.ndarray:
        """Unit id of every atom (connected components of the union edges)."""
        return connected_components(self.n_atoms, *self.edge_arrays())


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (the smallest member) of nodes ``0..n-1`` joined by edges ``a[i] - b[i]``
    (vectorized min-label hooking with pointer jumping; no scipy needed)."""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        differ = lo != hi
        if not differ.any():
            break
        np.minimum.at(parent, hi[differ], lo[differ])
        while True:  # point every node at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        a, b = a[differ], b[differ]
    return parent


def tensor_leaves(value: Any):
    """Every tensor inside ``value`` (nested tuples, lists and dict values), depth first."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensor_leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensor_leaves(v)


def _describe(node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__name__', node.target)}"
