"""``channel_prune`` + ``shrink`` on ``trace_hf`` graphs of tiny BERT, GPT-2 (``Conv1D``) and Llama (GQA): the
shrunk model equals the masked one, the MLP intermediate dim and the attention within-head dims shrink, and the
transformer blocks lose parameters; T5 too (its per-head position bias reaches sdpa as ``attn_mask``). The
residual stream (hidden size) stays whole: LayerNorm/RMSNorm statistics span it (a barrier by exactness)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsifx.hf_tracing import trace_hf  # noqa: E402
from sparsifx.passes.channels import ChannelPrune, Shrink  # noqa: E402

V = 100
COMMON = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=V)


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(**COMMON, max_position_embeddings=32))


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=64, n_head=4, n_inner=128, n_layer=2, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )


def _llama():
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=32)
    )


def _t5():  # per-head position bias: an Embedding of n_heads added to the scores as sdpa's attn_mask
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    )


# model builder, prefix of the block parameters, block ratio observed at ratio 0.5 (asserted with a small margin),
# {layer: (weight dim, most size after shrink)} of the first block
CASES = {
    "bert": (
        _bert,
        "bert.encoder.layer.",
        0.5057,
        {
            "bert.encoder.layer.0.intermediate.dense": (0, 64),
            "bert.encoder.layer.0.output.dense": (1, 64),
            "bert.encoder.layer.0.attention.self.query": (0, 32),
            "bert.encoder.layer.0.attention.self.value": (0, 32),
            "bert.encoder.layer.0.attention.output.dense": (1, 32),
        },
    ),
    "gpt2": (
        _gpt2,
        "transformer.h.",
        0.5060,
        {
            "transformer.h.0.mlp.c_fc": (1, 64),
            "transformer.h.0.mlp.c_proj": (0, 64),
            "transformer.h.0.attn.c_attn": (1, 191),
            "transformer.h.0.attn.c_proj": (0, 63),
        },
    ),  # q/k and v: one group
    "llama": (
        _llama,
        "model.layers.",
        0.5018,
        {
            "model.layers.0.mlp.gate_proj": (0, 64),
            "model.layers.0.mlp.up_proj": (0, 64),
            "model.layers.0.mlp.down_proj": (1, 64),
            "model.layers.0.self_attn.q_proj": (0, 32),
            "model.layers.0.self_attn.k_proj": (0, 16),
            "model.layers.0.self_attn.v_proj": (0, 16),
            "model.layers.0.self_attn.o_proj": (1, 32),
        },
    ),
    "t5": (
        _t5,
        ".block.",
        0.5030,
        {
            "encoder.block.0.layer.0.SelfAttention.q": (0, 32),
            "encoder.block.0.layer.0.SelfAttention.o": (1, 32),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias": (1, 4),  # heads kept whole
            "decoder.block.0.layer.2.DenseReluDense.wi": (0, 64),
        },
    ),
}


def _inputs() -> dict:
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _params(gm, prefix: str = "") -> int:
    return sum(p.numel() for n, p in gm.named_parameters() if prefix in n)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_hf_prune_shrink_exact(kind):
    build, prefix, observed, shapes = CASES[kind]
    torch.manual_seed(0)
    inputs = _inputs()
    if kind == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    gm = trace_hf(build().eval(), inputs)
    blocks0, whole0 = _params(gm, prefix), _params(gm)
    result = ChannelPrune(ratio=0.5)(gm)
    assert result.modified
    outcome = result.gm.meta["channel_outcome"]
    assert outcome.removed > 0
    if kind != "t5":  # T5's RMSNorm keeps the residual stream whole through "other fixed" channels
        assert outcome.blockers[0]["op"] in ("LayerNorm", ".mean()")  # the residual stream: norm statistics
    masked = result.gm(**inputs)[0]
    gm = Shrink()(result.gm).gm
    gm.graph.lint()
    torch.testing.assert_close(gm(**inputs)[0], masked)
    for name, (dim, size) in shapes.items():
        assert gm.get_submodule(name).weight.shape[dim] <= size, name
    block_ratio = _params(gm, prefix) / blocks0
    assert block_ratio < observed + 0.01, block_ratio
    assert _params(gm) / whole0 < 1
