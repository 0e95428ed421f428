"""Mutated save files for fuzzing: byte flips, truncations, pickle splices and structural payload mutations.

``mutate(kind, good_bytes, payload, rng) -> bytes``; every kind is deterministic given ``rng``. Used by
tests/security/test_save_file_fuzz.py (hypothesis) and benchmarks/save_file_fuzz.py (thousands of files).
"""

from __future__ import annotations

import copy
import io
import random
import zipfile
from typing import Any, Callable

import torch
import torch.nn as nn

import sparsifx
from sparsifx.serialization import to_payload


class FuzzNet(nn.Module):
    """Conv/BN/ReLU, a residual add, a keyword call, a getattr and a Sequential: many record kinds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.body(x) + x.mean(dim=1, keepdim=True)
        return self.head(torch.flatten(y.mean(dim=(2, 3)), 1)).softmax(dim=-1), y.shape[0]


def good_file() -> tuple[bytes, dict]:
    torch.manual_seed(0)
    payload = to_payload(sparsifx.trace(FuzzNet().eval()))
    return to_bytes(payload), payload


def to_bytes(payload: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _flip(data: bytes, payload: dict, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(data: bytes, payload: dict, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def _splice_pickle(data: bytes, payload: dict, rng: random.Random) -> bytes:
    """Rewrite the archive with random bytes inserted into, or overwritten in, its ``data.pkl``."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            raw = src.read(info)
            if info.filename.endswith("data.pkl"):
                at = rng.randrange(len(raw))
                junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
                raw = raw[:at] + junk + raw[at + (len(junk) if rng.random() < 0.5 else 0) :]
            dst.writestr(info, raw)
    return buf.getvalue()


_JUNK: list[Callable[[random.Random], Any]] = [
    lambda r: None,
    lambda r: r.choice([True, False]),
    lambda r: r.randint(-(2**70), 2**70),
    lambda r: r.choice([float("nan"), float("inf"), -0.0, 1e308]),
    lambda r: "",
    lambda r: "x" * r.randint(1, 300),
    lambda r: r.choice(["__class__", "a.b", "0", "self", 'x"y', "é", "lin.__dict__", "output", "*args"]),
    lambda r: [],
    lambda r: {},
    lambda r: [r.randint(0, 3)] * r.randint(1, 5),
    lambda r: {
        "$": r.choice(["node", "tuple", "dict", "slice", "size", "dtype", "device", "bogus"]),
        "v": r.choice([None, "x", 3, [], [1, 2, 3], [[1, 2]]]),
    },
    lambda r: torch.zeros(r.randint(0, 3)),
    lambda r: {1: 2},
    lambda r: (1, 2),
]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _structural(data: bytes, payload: dict, rng: random.Random) -> bytes:
    """Replace, delete or duplicate one random place of the payload (``tensors`` values excluded)."""
    p = copy.deepcopy(payload)
    for _ in range(rng.randint(1, 3)):
        paths = [q for q in _paths(p) if q and q[0] != "tensors" or q == ("tensors",)]
        path = rng.choice(paths)
        parent = p
        for key in path[:-1]:
            parent = parent[key]
        key, action = path[-1], rng.random()
        if action < 0.6:
            parent[key] = rng.choice(_JUNK)(rng)
        elif action < 0.8 and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, list):
            parent.insert(rng.randrange(len(parent) + 1), copy.deepcopy(parent[key]))
        else:
            parent[rng.choice(_JUNK[4:7])(rng)] = copy.deepcopy(parent[key])
    return to_bytes(p)


MUTATIONS: dict[str, Callable[[bytes, dict, random.Random], bytes]] = {
    "byte_flip": _flip,
    "truncate": _truncate,
    "pickle_splice": _splice_pickle,
    "structural": _structural,
}


def mutate(kind: str, data: bytes, payload: dict, rng: random.Random) -> bytes:
    return MUTATIONS[kind](data, payload, rng)
