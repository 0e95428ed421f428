"""Tied weights survive ``channel_prune`` + ``shrink``: holders of one ``nn.Parameter`` are coupled into one
channel group, cut once and still share one Parameter afterwards (shrunk == masked, fewer unique parameters);
a dim that one holder does not slice stays whole; a plan that would cut a tie two ways raises ``PassError``
and changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx import sparsify  # noqa: E402
from sparsifx.errors import PassError  # noqa: E402
from sparsifx.pass_manager import run_model  # noqa: E402
from sparsifx.passes.channels import ChannelPrune, Shrink  # noqa: E402
from sparsifx.testing import n_params, prune_and_shrink
from sparsifx.tracing import trace  # noqa: E402

X = (torch.randn(3, 4),)
TOKENS = (torch.randint(0, 16, (2, 5)),)


class SameStream(nn.Module):
    """``a`` and ``b`` share a weight, read the same input and are summed: the slices agree by themselves."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.a(h)) + torch.relu(self.b(h)))


class TwoStreams(nn.Module):
    """``a`` and ``b`` share a weight on independent streams: only coupling the tie keeps their cuts equal."""

    def __init__(self):
        super().__init__()
        self.p1, self.p2 = nn.Linear(4, 8), nn.Linear(4, 8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        y1 = torch.relu(self.a(torch.relu(self.p1(x))))
        y2 = torch.relu(self.b(torch.relu(self.p2(x))))
        return self.out(torch.cat([y1, y2], -1))


class TiedLM(nn.Module):
    """A language model whose output layer is its embedding (``lm_head.weight = embed.weight``)."""

    def __init__(self, vocab: int = 16, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp1, self.mlp2 = nn.Linear(dim, 12), nn.Linear(12, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        return self.lm_head(h + self.mlp2(torch.relu(self.mlp1(h))))


def opaque_linear(x, weight):
    """A function the channel analysis has no rule for (kept as one call by ``torch.fx.wrap``)."""
    return F.linear(x, weight)


torch.fx.wrap("opaque_linear")


class Proj(nn.Module):
    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return opaque_linear(x, self.weight)


class OpaqueHolder(nn.Module):
    """``proj`` (kept opaque: no channel rule) holds ``a``'s weight; ``c`` is free to prune."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.c, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(4, 8), nn.Linear(24, 2)
        self.proj = Proj(self.a.weight)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.cat([torch.relu(self.a(h)), torch.relu(self.proj(h)), torch.relu(self.c(x))], -1))


@pytest.mark.parametrize("round_to", [1, 4])
@pytest.mark.parametrize("cls", [SameStream, TwoStreams])
def test_tied_linears_stay_tied_and_exact(cls, round_to):
    torch.manual_seed(0)
    model = cls()
    gm, _, _ = prune_and_shrink(model, X, round_to=round_to)  # shrunk == masked, fewer params, lint, shapes
    assert gm.a.weight is gm.b.weight
    assert gm.a.out_features == gm.b.out_features < 8
    assert n_params(gm) < n_params(model)
    if cls is TwoStreams:  # the tie couples the streams feeding a and b
        assert gm.p1.out_features == gm.p2.out_features == gm.a.in_features < 8


@pytest.mark.parametrize("round_to", [1, 4])
def test_tied_embedding_and_lm_head_stay_tied(round_to):
    torch.manual_seed(0)
    model = TiedLM()
    gm, masked, out = prune_and_shrink(model, TOKENS, round_to=round_to)
    torch.testing.assert_close(out, masked)
    assert gm.lm_head.weight is gm.embed.weight
    assert gm.embed.num_embeddings == gm.lm_head.out_features == 16  # the vocabulary is never cut
    assert gm.embed.embedding_dim == gm.lm_head.in_features < 8
    assert n_params(gm) < n_params(model)  # unique parameters: the tie counts once


def test_sparsify_with_tied_weights_verifies_and_counts_unique_parameters():
    torch.manual_seed(0)
    model = TiedLM()
    recipe = {"stages": [{"pass": "channel_prune", "ratio": 0.5, "round_to": 4}, {"pass": "shrink"}]}
    gm = sparsify(model, recipe, example_inputs=TOKENS, verify=True)
    assert gm.lm_head.weight is gm.embed.weight
    assert [(h.name, h.modified, h.verified) for h in gm.meta["history"]] == [
        ("channel_prune", True, False),
        ("shrink", True, True),
    ]
    assert n_params(gm) < n_params(model)
    assert model.lm_head.weight is model.embed.weight and model.embed.embedding_dim == 8  # the user's model


def test_a_holder_that_does_not_slice_keeps_the_tied_tensor_whole():
    torch.manual_seed(0)
    recipe = {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]}
    gm = sparsify(OpaqueHolder(), recipe, example_inputs=X, verify=True, leaf_modules=["proj"])
    assert gm.proj.weight is gm.a.weight and gm.a.weight.shape == (8, 8)
    assert gm.inp.out_features == 8 and gm.c.out_features == 4  # the rest is still pruned


def test_a_parameter_also_read_by_get_attr_keeps_the_dims_the_read_does_not_label():
    """Traced through, ``proj.weight`` is a ``get_attr`` of ``a.weight`` feeding ``opaque_linear`` (a barrier)."""
    torch.manual_seed(0)
    recipe = {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]}
    gm = sparsify(OpaqueHolder(), recipe, example_inputs=X, verify=True)
    assert any(n.op == "get_attr" and n.target == "a.weight" for n in gm.graph.nodes)
    assert any(n.op == "call_function" and n.target is opaque_linear for n in gm.graph.nodes)
    assert gm.a.weight.shape == (8, 8) and gm.c.out_features == 4


def test_a_parameter_also_read_by_f_linear_is_cut_with_both_readers():
    """``F.linear`` now has a rule: the tied ``a.weight`` read by ``a`` and by ``F.linear`` is cut once, exactly."""

    class FnProj(Proj):
        def forward(self, x):
            return F.linear(x, self.weight)

    class Holder(OpaqueHolder):
        def __init__(self):
            super().__init__()
            self.proj = FnProj(self.a.weight)

    torch.manual_seed(0)
    recipe = {"stages": [{"pass": "channel_prune", "ratio": 0.5}, {"pass": "shrink"}]}
    gm = sparsify(Holder(), recipe, example_inputs=X, verify=True)
    assert gm.a.weight.shape[0] < 8 and gm.c.out_features == 4


def test_a_plan_that_cuts_a_tie_two_ways_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = TwoStreams()
    model.b.weight = nn.Parameter(model.a.weight.detach().clone())  # untied while the plan is made
    gm = trace(model.eval(), X)
    gm.meta["example_inputs"] = X
    ChannelPrune(ratio=0.5)(gm)
    gm.b.weight = gm.a.weight  # tied after channel_prune: the plan cuts a and b differently
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(PassError, match=r"shrink would untie 'a.weight' and 'b.weight'.*nothing was changed"):
        Shrink()(gm)
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert gm.a.weight is gm.b.weight and gm.a.weight.shape == (8, 8)
    run_model(gm, X)  # still a working (masked) model
