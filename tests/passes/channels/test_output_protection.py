"""Outputs are sacred: every tensor that reaches the graph output keeps all its channels, whatever container
carries it (tuple concatenation, slicing, dicts, lists, namedtuples, nesting), while the inside is pruned."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from sparsifx.pass_manager import run_model
from sparsifx.passes.channels import ChannelPrune, Shrink, analyze_channels
from sparsifx.tracing import trace

X = (torch.randn(2, 3, 8, 8),)
Out = collections.namedtuple("Out", ["logits", "hidden"])


class Untraceable(nn.Module):
    """Returns a tuple; data-dependent control flow makes the tracer keep it as an opaque leaf (as with
    many Hugging Face submodules), so its tuple is a graph node, not a Python tuple."""

    def forward(self, x):
        if x.sum() > -1e30:
            return x, x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
        return x, x, x


class Classifier(nn.Module):
    """conv-BN-ReLU-conv-BN -> pool -> linear-ReLU-linear (2 classes); ``forward`` returns via ``idiom``.
    No output passes through a final ReLU, so a channel that is zero in the masked output was pruned."""

    def __init__(self, idiom: str):
        super().__init__()
        self.idiom = idiom
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.enc = Untraceable()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)
        for m in self.modules():  # non-trivial running stats, so that shrunk == masked is a real check
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)

    def forward(self, x):
        outputs = self.enc(self.body(x))  # (features, pooled, maxed): a graph node
        hidden = self.fc1(outputs[1])
        logits = self.fc2(torch.relu(hidden))
        parts = torch.chunk(logits, 2, dim=1)  # a tuple node made by an op with a rule
        return {
            "tuple_concat": lambda: (logits,) + outputs[1:],  # HF return_dict=False
            "tuple_concat_items": lambda: (parts[0],) + parts[1:],
            "tuple_slice": lambda: ((logits,) + outputs[1:])[:2],
            "dict": lambda: {"logits": logits, "hidden": hidden},
            "list": lambda: [logits, hidden],
            "namedtuple": lambda: Out(logits, hidden),
            "nested": lambda: {"out": ((logits,) + outputs[2:], [hidden]), "n": 1},
            "repacked": lambda: (outputs[0],) + ((logits,) + outputs[1:])[0:1],
            "size_out": lambda: (logits, hidden.size(1)),
            "plain": lambda: logits,
        }[self.idiom]()


def _leaves(value):
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _zero_channels(t: torch.Tensor) -> int:
    return int((t.transpose(0, 1).reshape(t.shape[1], -1).abs().sum(1) == 0).sum()) if t.ndim > 1 else 0


def prune_shrink(idiom: str):
    torch.manual_seed(0)
    gm = trace(Classifier(idiom).eval(), X)
    gm.meta["example_inputs"] = X
    assert gm.meta["opaque_leaves"] == ["enc"]
    dense = run_model(gm, X)
    before = sum(p.numel() for p in gm.parameters())
    assert ChannelPrune(ratio=0.5)(gm).modified is True
    masked = run_model(gm, X)
    for d, m in zip(_leaves(dense), _leaves(masked)):
        assert m.shape == d.shape and _zero_channels(m) == _zero_channels(d)  # no output channel zeroed
    assert gm.fc2.weight.abs().sum(1).ne(0).all()
    assert Shrink()(gm).modified is True
    gm.graph.lint()
    out = run_model(gm, X)
    assert tree_flatten(out)[1] == tree_flatten(dense)[1]
    assert [o.shape for o in _leaves(out)] == [d.shape for d in _leaves(dense)]  # every output full size
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    assert gm.fc2.out_features == 2
    assert sum(p.numel() for p in gm.parameters()) < before  # the inside was still pruned
    assert gm.get_submodule("body.0").out_channels == 4
    return gm, dense, out


@pytest.mark.parametrize(
    "idiom",
    [
        "tuple_concat",
        "tuple_concat_items",
        "tuple_slice",
        "dict",
        "list",
        "namedtuple",
        "nested",
        "repacked",
        "size_out",
    ],
)
def test_outputs_in_containers_keep_all_channels(idiom):
    gm, _, _ = prune_shrink(idiom)
    hidden_returned = idiom in ("dict", "list", "namedtuple", "nested", "size_out")
    assert gm.fc1.out_features == (16 if hidden_returned else 8)


def test_namedtuple_output_keeps_all_channels_when_masked():
    torch.manual_seed(0)
    gm = trace(Classifier("namedtuple").eval(), X)
    dense = run_model(gm, X)
    assert ChannelPrune(ratio=0.5)(gm).modified is True
    masked = run_model(gm, X)
    assert type(masked) is Out and masked.logits.shape == dense.logits.shape
    assert _zero_channels(masked.logits) == _zero_channels(masked.hidden) == 0
    assert (gm.get_submodule("body.0").weight.flatten(1).abs().sum(1) == 0).sum() == 4


def test_plain_return_still_protected_and_pruned():
    gm, dense, out = prune_shrink("plain")
    assert out.shape == dense.shape == (2, 2)


def test_tuple_concat_keeps_channels_linked_for_later_consumers():
    """A re-packed tuple read again inside the model: its items keep their producers' channels."""

    class Repack(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Untraceable()
            self.fc1, self.fc2 = nn.Linear(3, 16), nn.Linear(16, 4)

        def forward(self, x):
            outputs = self.enc(x)
            t = (torch.relu(self.fc1(outputs[1])),) + outputs[1:]
            return self.fc2(t[0]), t[2]

    torch.manual_seed(0)
    gm = trace(Repack().eval(), X)
    gm.meta["example_inputs"] = X
    ChannelPrune(ratio=0.5)(gm)
    masked = run_model(gm, X)
    Shrink()(gm)
    assert gm.fc1.out_features == gm.fc2.in_features == 8
    torch.testing.assert_close(run_model(gm, X), masked)


def test_container_op_it_cannot_follow_is_a_barrier():
    """``(logits,) * n`` with ``n`` unknown to the analysis: the operands stay whole (fail safe)."""

    class Repeat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 16), nn.Linear(16, 2)

        def forward(self, x):
            logits = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))
            return (logits,) * (x.numel() // x.numel())

    gm = trace(Repeat().eval(), X)
    a = analyze_channels(gm)
    assert any(b["reason"] == "container operation the analysis cannot follow" for b in a.barriers)
    ChannelPrune(ratio=0.5)(gm)
    assert gm.fc2.weight.abs().sum(1).ne(0).all()
    assert (gm.fc1.weight.abs().sum(1) == 0).sum() == 8  # only the output is kept whole
