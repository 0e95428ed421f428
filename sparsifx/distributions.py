"""Per-layer sparsity distributions: uniform, Erdős–Rényi (ER) and ER-Kernel (ERK).

Follows docs/algorithms.md#layer-sparsity-distributions (rigl ``sparse_utils.get_sparsities_erdos_renyi``): densities
``d_l = ε·r_l`` with ``r_l = sum(shape)/prod(shape)`` (ERK) or ``(n_out+n_in)/(n_out·n_in)`` (ER, dims
0 and 1 of the PyTorch layout), ε solved so the non-zero count equals the uniform budget; layers
whose density would exceed 1 are made dense and ε is solved again. Layers in ``custom`` keep their
value and are left out of the budget.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from . import validate
from .errors import RecipeError

KINDS = ("uniform", "er", "erk")


def _raw_score(shape: Sequence[int], kind: str, power: float) -> float:
    dims = list(shape) if kind == "erk" else list(shape[:2])
    return (sum(dims) / math.prod(dims)) ** power


def layer_sparsities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    kind: str = "erk",
    dense_layers: Sequence[str] = (),
    custom: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Sparsity per layer (name -> s_l) for a global target ``sparsity`` over ``shapes`` (weight shapes)."""
    validate.number("sparsity", sparsity, 0.0, 1.0, hi_open=True)
    validate.choice("distribution", kind, KINDS)
    custom = dict(custom or {})
    unknown = set(dense_layers) - set(shapes)
    if unknown:
        raise RecipeError("unknown layers in dense_layers", "dense_layers", sorted(unknown), ", ".join(shapes))
    free = {n: s for n, s in shapes.items() if n not in custom}
    if kind == "uniform":
        out = {n: (0.0 if n in dense_layers else float(sparsity)) for n in free}
        return {**out, **custom}
    dense = set(dense_layers)
    numel = {n: math.prod(s) for n, s in free.items()}
    score = {n: _raw_score(s, kind, erk_power_scale) for n, s in free.items()}
    while True:
        rhs = 0.0
        divisor = 0.0
        for n in free:
            zeros = math.floor(sparsity * numel[n])
            if n in dense:
                rhs -= zeros
            else:
                rhs += numel[n] - zeros
                divisor += score[n] * numel[n]
        if divisor == 0:
            raise RecipeError(
                "every layer was forced dense; no layer can absorb the sparsity budget",
                "sparsity",
                sparsity,
                "a lower sparsity or fewer dense layers",
            )
        eps = rhs / divisor
        candidates = [n for n in free if n not in dense]
        top = max(score[n] for n in candidates)
        if eps * top > 1:
            dense |= {n for n in candidates if score[n] == top}
            continue
        break
    out = {n: (0.0 if n in dense else 1.0 - eps * score[n]) for n in free}
    return {**out, **custom}


def er_epsilon_density(shape: Sequence[int], epsilon: float) -> float:
    """SET-style ER density ``min(1, ε(n_in+n_out)/(n_in·n_out))`` for an ``(out, in, ...)`` weight."""
    n_out, n_in = shape[0], math.prod(shape[1:])
    return min(1.0, epsilon * (n_in + n_out) / (n_in * n_out))
