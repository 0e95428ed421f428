"""``channel_prune(streams="approximate")``: the residual stream of a tiny pre-norm transformer (Embedding ->
[norm -> q/k/v -> sdpa -> o -> add -> norm -> MLP -> add] x 2 -> norm -> head) is one group pruned through
LayerNorm / RMSNorm / F.layer_norm / an HF-style traced-into RMSNorm, recorded as approximations, with the output
deviation measured and the shrink verification explicitly waived; ``exact`` keeps it whole (barriers)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsifx.errors import RecipeError
from sparsifx.pass_manager import PassManager
from sparsifx.passes.channels import ChannelPrune, Shrink, analyze_channels
from sparsifx.tracing import trace

D, HEADS, VOCAB = 32, 4, 50


class HFRMSNorm(nn.Module):
    """HF LlamaRMSNorm / T5LayerNorm written out: traced into (mean of squares, rsqrt, weight)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FnLayerNorm(nn.Module):
    """A LayerNorm written with ``F.layer_norm`` (traced into: its ``normalized_shape`` is a graph constant)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight, self.bias, self.shape = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), (d,)

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight, self.bias, 1e-5)


NORMS = {"layer_norm": nn.LayerNorm, "rms_norm": nn.RMSNorm, "hf_rms_norm": HFRMSNorm, "f_layer_norm": FnLayerNorm}


class Block(nn.Module):
    def __init__(self, norm, extra_sum: bool = False):
        super().__init__()
        self.n1, self.n2 = norm(D), norm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.extra_sum = extra_sum

    def forward(self, x):
        b, t, _ = x.shape
        y = self.n1(x)
        heads = lambda z: z.view(b, t, HEADS, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(heads(self.q(y)), heads(self.k(y)), heads(self.v(y)))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        if self.extra_sum:  # a channel-wide sum broadcast back: not a normalisation statistic
            x = x * x.sum(-1, keepdim=True)
        return x + self.down(F.gelu(self.up(self.n2(x))))


class Tiny(nn.Module):
    def __init__(self, norm=nn.LayerNorm, head: bool = True, extra_sum: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(norm, extra_sum) for _ in range(2))
        self.norm = norm(D)
        self.head = nn.Linear(D, VOCAB) if head else nn.Identity()

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _traced(norm=nn.LayerNorm, **kw):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    model = Tiny(norm, **kw).eval()
    with torch.no_grad():  # non-trivial norm affine params, so importance and deviation see them
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, HFRMSNorm, FnLayerNorm)):
                m.weight.uniform_(0.5, 1.5)
    gm = trace(model, (ids,))
    gm.meta["example_inputs"] = (ids,)
    return gm, ids


def _hidden_sizes(gm) -> dict[str, int]:
    """The residual-stream size seen by every member layer."""
    sizes = {"emb": gm.emb.weight.shape[1], "norm": gm.norm.weight.shape[0], "head": gm.head.weight.shape[1]}
    for i in range(2):
        block = gm.get_submodule(f"blocks.{i}")
        for name in ("n1", "n2"):
            sizes[f"{i}.{name}"] = getattr(block, name).weight.shape[0]
        for name in ("q", "k", "v", "up"):
            sizes[f"{i}.{name}"] = getattr(block, name).weight.shape[1]
        for name in ("o", "down"):
            sizes[f"{i}.{name}"] = getattr(block, name).weight.shape[0]
    return sizes


def test_exact_keeps_stream_whole():
    gm, ids = _traced()
    ChannelPrune(ratio=0.5)(gm)
    reasons = {b["node"]: b["reason"] for b in gm.meta["channel_barriers"]}
    assert reasons["norm"] == "LayerNorm statistics span these channels (pruning is not exact)"
    assert gm.meta["channel_outcome"].streams is None and gm.meta["channel_plan"].streams is None
    masked = gm(ids)
    Shrink()(gm)
    assert set(_hidden_sizes(gm).values()) == {D}
    assert "streams" not in gm.meta["channel_report"]
    torch.testing.assert_close(gm(ids), masked)


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_approximate_prunes_stream(kind, caplog):
    gm, ids = _traced(NORMS[kind])
    with torch.no_grad():
        reference = gm(ids)
    groups = analyze_channels(gm, streams="approximate").groups
    stream = [g for g in groups if "emb" in g.modules]
    assert len(stream) == 1 and {"blocks.0.o", "blocks.1.down"} <= set(stream[0].modules)
    with caplog.at_level(logging.WARNING):
        result = ChannelPrune(ratio=0.5, streams="approximate")(gm)
        assert result.modified
        assert not [b for b in gm.meta["channel_barriers"] if "statistic" in b["reason"]]
        approximated = {a["node"] for a in gm.meta["channel_outcome"].streams["approximations"]}
        assert len(approximated) == 5  # two norms per block and the final one
        Shrink()(gm)
    gm.graph.lint()
    assert set(_hidden_sizes(gm).values()) == {D // 2}, _hidden_sizes(gm)
    with torch.no_grad():
        out = gm(ids)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    report = gm.meta["channel_report"]["streams"]
    deviation = (out - reference).norm() / reference.norm()
    assert report["deviation"] == pytest.approx(float(deviation), rel=1e-4)
    assert 0 < report["deviation_approximation"] and 0 < report["deviation_masked"]
    assert report["exactness_check"].startswith("skipped") and report["inputs"] == "example inputs"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fine-tune" in w and "deviation" in w for w in warnings if w.startswith("shrink"))
    assert any("approximate streams" in n for n in gm.meta["report_notes"])


def test_output_never_pruned():
    gm, ids = _traced(head=False)  # the normalised stream is the model output
    ChannelPrune(ratio=0.5, streams="approximate")(gm)
    Shrink()(gm)
    assert gm(ids).shape == (2, 6, D)
    assert gm.emb.weight.shape[1] == D and gm.norm.weight.shape[0] == D
    assert gm.get_submodule("blocks.0.up").weight.shape[0] == D  # the MLP hidden dim is still pruned


def test_other_channel_reductions_stay_barriers():
    gm, _ = _traced(extra_sum=True)
    ChannelPrune(ratio=0.5, streams="approximate")(gm)
    reasons = [(b["op"], b["reason"]) for b in gm.meta["channel_barriers"]]
    assert ("method .sum()", "reduces across channels") in reasons
    assert gm.meta["channel_outcome"].streams is None  # the stream stays whole: nothing approximated


def test_manager_waives_verification_explicitly():
    gm, ids = _traced(HFRMSNorm)
    history = (
        PassManager([ChannelPrune(ratio=0.5, streams="approximate"), Shrink()], example_inputs=(ids,), verify=True)
        .run(gm)
        .history
    )
    assert history[1].name == "shrink" and not history[1].verified and history[1].waived.startswith("skipped")
    gm, ids = _traced(HFRMSNorm)
    history = PassManager([ChannelPrune(ratio=0.5), Shrink()], example_inputs=(ids,), verify=True).run(gm).history
    assert history[1].verified and history[1].waived is None


def test_bad_streams_value():
    with pytest.raises(RecipeError, match="streams"):
        ChannelPrune(streams="approx")
    with pytest.raises(RecipeError, match="streams"):
        ChannelPrune.from_params({"ratio": 0.5, "streams": 1})
    assert ChannelPrune.from_params({"streams": "approximate"}).streams == "approximate"


def test_hf_llama_stream():
    """HF Llama (GQA, traced-into LlamaRMSNorm: ``.pow(2).mean(-1, keepdim=True)``, ``rsqrt``, ``weight *``)."""
    transformers = pytest.importorskip("transformers")
    from sparsifx.hf_tracing import trace_hf

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            num_hidden_layers=1,
            vocab_size=VOCAB,
            max_position_embeddings=16,
        )
    )
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    gm = trace_hf(model.eval(), {"input_ids": ids})
    gm.meta["example_inputs"] = (ids,)
    ChannelPrune(ratio=0.5, streams="approximate")(gm)
    ops = {a["op"] for a in gm.meta["channel_outcome"].streams["approximations"]}
    assert ops == {"method .mean()"}
    Shrink()(gm)
    gm.graph.lint()
    sizes = [
        gm.get_submodule("model.embed_tokens").weight.shape[1],
        gm.get_submodule("model.norm").weight.shape[0],
        gm.get_submodule("model.layers.0.self_attn.q_proj").weight.shape[1],
        gm.get_submodule("model.layers.0.self_attn.o_proj").weight.shape[0],
        gm.get_submodule("model.layers.0.mlp.down_proj").weight.shape[0],
        gm.get_submodule("lm_head").weight.shape[1],
    ]
    assert sizes == [16] * 6
    assert gm(ids)[0].shape == (1, 6, VOCAB)
    assert gm.meta["channel_report"]["streams"]["deviation"] > 0
