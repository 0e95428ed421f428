"""Small tensor helpers shared by the DST methods: exact top-k masks, random masks, optimizer slots.

Every function is deterministic given its ``torch.Generator`` so that all ranks of a distributed
run reach the same decision from the same inputs (see ``distributed.py``).
"""

from __future__ import annotations

import hashlib

import torch

from sparsifx.errors import PassError

# optimizer state keys that hold per-weight slots ("momentum") for the optimizers torch ships
SLOT_KEYS = (
    "momentum_buffer",
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "square_avg",
    "acc_delta",
    "sum",
    "ax",
    "mu_product",
    "prev",
    "exp_inf",
)


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded from a hash of ``parts``: the same on every rank and run, and independent of
    ``torch.manual_seed(seed)`` streams (a mask drawn from the very stream that initialised the weights,
    e.g. both from seed 0, would correlate with their magnitudes)."""
    digest = hashlib.sha256(repr(("sparsifx",) + tuple(parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with exactly ``k`` True at the largest ``score`` entries (index-based, ties broken by index)."""
    out = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    k = max(0, min(int(k), score.numel()))
    if k:
        out[torch.topk(score.flatten(), k, sorted=False).indices] = True
    return out.view_as(score)


def random_mask(shape, k: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``k`` True positions drawn uniformly without replacement."""
    n = 1
    for s in shape:
        n *= int(s)
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=generator)[: max(0, min(int(k), n))]] = True
    return out.view(*shape)


def random_among(candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` positions chosen uniformly among the True entries of ``candidates`` (no duplicates)."""
    idx = candidates.flatten().nonzero().squeeze(1)
    k = min(int(k), idx.numel())
    out = torch.zeros(candidates.numel(), dtype=torch.bool)
    if k:
        out[idx[torch.randperm(idx.numel(), generator=generator)[:k]]] = True
    return out.view_as(candidates)


def bernoulli_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=generator) < density


def noise(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def zero_slots(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> int:
    """Zero the optimizer's per-weight slots (momentum, Adam moments, ...) of ``param`` at ``where``."""
    if optimizer is None or param not in optimizer.state:
        return 0
    count = 0
    for key, value in optimizer.state[param].items():
        if key in SLOT_KEYS and isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), 0)
            count += 1
    return count


def momentum_of(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> torch.Tensor:
    """Sparse momentum's momentum: SGD ``momentum_buffer``; Adam-style ``exp_avg/(sqrt(exp_avg_sq)+1e-8)``."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    if isinstance(state.get("momentum_buffer"), torch.Tensor):
        return state["momentum_buffer"]
    if isinstance(state.get("exp_avg"), torch.Tensor) and isinstance(state.get("exp_avg_sq"), torch.Tensor):
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    raise PassError(
        "sparse_momentum needs an optimizer with momentum (SGD momentum>0 or Adam-style exp_avg) that "
        "has taken at least one step; found state keys "
        f"{sorted(state)} for a weight of shape {tuple(param.shape)}"
    )


# --- index-based sampling for sparse storage (no tensor of the dense weight's size) -----------------------------
# at most this many positions (a 2048 x 2048 layer): draw exactly as the masked storage does, for identical
# topologies; beyond, index sampling (a 4096 x 4096 dense-size draw took 23 s per SET evolution)
DENSE_DRAW_LIMIT = 1 << 22


def random_keys(numel: int, k: int, generator: torch.Generator, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` sorted linear positions in ``[0, numel)`` drawn uniformly without replacement, avoiding the sorted
    positions ``excluded``, by rejection sampling (as SET's reference code): memory O(k), never O(numel)."""
    excluded = torch.zeros(0, dtype=torch.int64) if excluded is None else excluded.to(torch.int64).cpu()
    free = numel - excluded.numel()
    k = max(0, min(int(k), free))
    chosen = torch.zeros(0, dtype=torch.int64)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(0, numel, (int(need * 1.1) + 64,), generator=generator, dtype=torch.int64)
        draw = torch.unique(draw)
        if excluded.numel():
            pos = torch.searchsorted(excluded, draw).clamp(max=excluded.numel() - 1)
            draw = draw[excluded[pos] != draw]
        if chosen.numel():
            pos = torch.searchsorted(chosen, draw).clamp(max=chosen.numel() - 1)
            draw = draw[chosen[pos] != draw]
        if draw.numel() > need:
            draw = draw[torch.randperm(draw.numel(), generator=generator)[:need]]
        chosen = torch.cat([chosen, draw]).sort().values
    return chosen


def keys_of(mask: torch.Tensor) -> torch.Tensor:
    """Sorted row-major linear positions of the True entries of ``mask``."""
    return mask.flatten().nonzero().squeeze(1)


def remap_slots(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, source: torch.Tensor) -> int:
    """After ``param``'s entries were rearranged (entry ``i`` of the new data came from old entry ``source[i]``, or
    is new where ``source[i] < 0``), rearrange its optimizer slots the same way (new entries: 0). Returns how many
    state tensors were remapped. Call before ``param.data`` is replaced."""
    if optimizer is None or param not in optimizer.state:
        return 0
    count = 0
    source = source.to(param.device)
    old = source >= 0
    for key, value in list(optimizer.state[param].items()):
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
            new = value.new_zeros(source.shape)
            new[old] = value[source[old]]
            optimizer.state[param][key] = new
            count += 1
    return count


def swap_param(optimizer: torch.optim.Optimizer | None, old: torch.Tensor, new: torch.Tensor) -> None:
    """Make ``optimizer`` optimise ``new`` instead of ``old`` (same group, its state moved over)."""
    if optimizer is None or old is new:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        optimizer.state[new] = optimizer.state.pop(old)
