"""``channel_prune(attention=...)``: whole attention heads (MHA/sdpa, grouped-query attention, decomposed
``nn.MultiheadAttention``, torchvision Swin window attention V1/V2, a tiny HF Llama) prune exactly (shrunk ==
masked with randomised norms), head counts shrink; ``both`` prunes heads then within-head dims; bad values are
``RecipeError``s."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

from sparsifx.errors import RecipeError
from sparsifx.passes.channels import ChannelPrune
from sparsifx.passes.channels.heads import find_head_splits
from sparsifx.testing import prune_and_shrink
from sparsifx.tracing import trace


def _randomise_norms(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return model


class Block(nn.Module):
    """Pre-norm attention block: q/k/v/o linears, heads by ``view``, ``sdpa``; ``kv_heads < heads`` repeats each
    key/value head for its query heads (``expand`` + ``reshape``, or ``enable_gqa``)."""

    def __init__(self, dim=32, heads=4, kv_heads=4, gqa_sdpa=False):
        super().__init__()
        self.h, self.kv, self.d, self.gqa_sdpa = heads, kv_heads, dim // heads, gqa_sdpa
        self.norm = nn.LayerNorm(dim)
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * self.d), nn.Linear(dim, kv_heads * self.d)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _heads(self, x, n):
        b, t, _ = x.shape
        return x.view(b, t, n, self.d).transpose(1, 2)

    def forward(self, x):
        b, t, c = x.shape
        y = self.norm(x)
        q, k, v = self._heads(self.q(y), self.h), self._heads(self.k(y), self.kv), self._heads(self.v(y), self.kv)
        if self.kv != self.h and not self.gqa_sdpa:
            rep = self.h // self.kv
            k = k[:, :, None].expand(b, self.kv, rep, t, self.d).reshape(b, self.h, t, self.d)
            v = v[:, :, None].expand(b, self.kv, rep, t, self.d).reshape(b, self.h, t, self.d)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.gqa_sdpa)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(x)


def _tokens():
    torch.manual_seed(0)
    return (torch.randn(2, 6, 32),)


def _prune(model, inputs, **kwargs):
    torch.manual_seed(0)
    return prune_and_shrink(_randomise_norms(model), inputs, **kwargs)[0]


def test_whole_heads_of_sdpa_block():
    gm = _prune(Block(), _tokens(), attention="heads")
    assert (gm.q.out_features, gm.k.out_features, gm.v.out_features, gm.o.in_features) == (16, 16, 16, 16)
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert [tuple(a.meta["tensor_meta"].shape) for a in sdpa.args[:3]] == [(2, 2, 6, 8)] * 3  # 2 heads of dim 8
    assert gm.get_submodule("mlp.0").out_features == 32


def test_head_dims_stay_the_default():
    gm = _prune(Block(), _tokens())
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert tuple(sdpa.args[0].meta["tensor_meta"].shape) == (2, 4, 6, 4)  # 4 heads of dim 4


@pytest.mark.parametrize("gqa_sdpa", [False, True], ids=["repeat_kv", "enable_gqa"])
def test_grouped_query_attention_prunes_whole_groups(gqa_sdpa):
    gm = _prune(Block(kv_heads=2, gqa_sdpa=gqa_sdpa), _tokens(), attention="heads")
    # one kv head goes with its 2 query heads: 1 of 2 groups kept, head dim 8 unchanged
    assert (gm.q.out_features, gm.k.out_features, gm.v.out_features, gm.o.in_features) == (16, 8, 8, 16)


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(32), nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        y = self.norm(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


def test_multihead_attention_is_decomposed_into_whole_heads():
    gm = _prune(MHABlock(), _tokens(), attention="heads")
    q = gm.get_submodule("attn.q_proj")
    assert (q.in_features, q.out_features) == (32, 16)
    split = next(n for n in gm.graph.nodes if n.target == "unflatten")
    assert split.args[2] == (-1, 8)  # shrink infers the head count, head dim 8 kept


def test_both_prunes_heads_then_dims():
    gm = _prune(Block(heads=4), _tokens(), attention="both")
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    _, heads, _, dim = sdpa.args[0].meta["tensor_meta"].shape
    assert heads == 3 and dim < 8  # 1 of 4 heads, then within-head dims of the 3 kept
    assert gm.q.out_features == heads * dim and gm.o.in_features == heads * dim


def _swin(v2=False):
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    torch.manual_seed(0)
    return tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10, **extra
    )


def _image():
    torch.manual_seed(0)
    return (torch.randn(1, 3, 32, 32),)  # 8 x 8 tokens in 4 x 4 windows: the second block of a stage is shifted


def _fused_barriers(gm) -> list:
    return [b for b in gm.meta["channel_barriers"] if "window attention" in b["reason"]]


def test_swin_window_attention_prunes_whole_heads():
    gm = _prune(_swin(), _image(), attention="heads")
    assert not _fused_barriers(gm)
    for stage, heads in ((1, 2), (3, 4)):
        for block in (0, 1):
            attn = gm.get_submodule(f"features.{stage}.{block}.attn")
            kept = attn.relative_position_bias_table.shape[1]
            assert kept == heads // 2  # the bias table is sliced per head
            assert attn.qkv.out_features == 3 * kept * 8 and attn.proj.in_features == kept * 8
    assert any(n.op == "get_attr" and n.target.endswith("shift_mask") for n in gm.graph.nodes)


def test_swin_window_attention_prunes_head_dims():
    gm = _prune(_swin(), _image())
    assert not _fused_barriers(gm)
    attn = gm.get_submodule("features.3.1.attn")
    assert attn.relative_position_bias_table.shape[1] == 4 and attn.qkv.out_features == 3 * 4 * 4


def test_swin_v2_cosine_attention_prunes_whole_heads():
    gm = _prune(_swin(v2=True), _image(), attention="heads")
    assert not _fused_barriers(gm)
    attn = gm.get_submodule("features.3.0.attn")
    assert attn.logit_scale.shape[0] == 2 and attn.get_submodule("cpb_mlp.2").out_features == 2
    assert attn.qkv.out_features == 3 * 2 * 8  # 2 of 4 heads of dim 8


def test_head_splits_are_found_only_before_attention():
    gm = trace(Block().eval(), _tokens())
    splits = find_head_splits(gm)
    assert sorted(splits) == ["view", "view_1", "view_2"] and set(splits.values()) == {(3,)}


def test_hf_llama_gqa_whole_heads():
    transformers = pytest.importorskip("transformers")
    from sparsifx.hf_tracing import trace_hf
    from sparsifx.passes.channels import Shrink

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            num_hidden_layers=1,
            vocab_size=50,
            max_position_embeddings=16,
        )
    ).eval()
    inputs = {"input_ids": torch.randint(3, 50, (1, 6), generator=torch.Generator().manual_seed(0))}
    gm = trace_hf(_randomise_norms(model), inputs)
    ChannelPrune(ratio=0.5, attention="heads")(gm)
    masked = gm(**inputs)[0]
    Shrink()(gm)
    torch.testing.assert_close(gm(**inputs)[0], masked)
    attn = "model.layers.0.self_attn."
    assert [gm.get_submodule(attn + p).out_features for p in ("q_proj", "k_proj", "v_proj")] == [16, 8, 8]


@pytest.mark.parametrize(
    "kwargs", [{"attention": "whole"}, {"attention": 2}, {"attention": "both", "min_achieved_ratio": 0.3}]
)
def test_bad_attention_parameter_is_a_recipe_error(kwargs):
    with pytest.raises(RecipeError):
        ChannelPrune(ratio=0.5, **kwargs)
