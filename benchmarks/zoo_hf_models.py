"""Tiny Hugging Face ``transformers`` models for ``zoo_sweep.py --zoo hf``: random weights from small configs.

Each entry gives the builder (a ``*For*`` model whose first output is logits), its inputs (token ids, batch 1,
seq 16, and an all-ones attention mask for text; 32 px pixel values for vision; T5 also gets ``decoder_input_ids``),
the output head Torch-Pruning ignores, and how Torch-Pruning's HF recipes see its attention (``HFSpec.tp``).
Every model has 2 layers (Swin: 2 stages of 2), hidden size 64, 4 heads (Llama/Mistral: 2 key/value heads), FFN 128,
vocabulary 1000. ``block_prefixes`` finds the transformer blocks (the encoder/decoder layer lists) that the params
ratio "over blocks" counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS = 1000, 16, 64, 4, 128, 2
IMAGE = 32  # ViT: patch 8 -> 16 tokens; Swin: patch 2 -> 16 x 16 tokens in windows of 4, then 8 x 8
NUM_LABELS = 10


@dataclass(frozen=True)
class TPAttention:
    """Torch-Pruning's view of one attention family (as in its ``examples/hf_transformers`` and
    ``examples/LLMs``): the attention module class name (matched as a suffix of the class name), its q/k/v
    projections (one fused name for GPT-2's ``c_attn``), the attribute that holds the number of heads (or a config
    key), and the attributes to rewrite after pruning."""

    cls: str
    qkv: tuple[str, ...]
    heads: str  # attribute on the attention module, or "config.<key>"
    kv_heads: str | None = None  # GQA: heads of k/v ("config.num_key_value_heads")
    head_dim_attrs: tuple[str, ...] = ()  # set to out_features // heads after head-dim pruning
    all_head_attrs: tuple[str, ...] = ()  # set to the q projection's out_features
    split_attr: str | None = None  # GPT-2: c_attn.split(split_size)


@dataclass(frozen=True)
class HFSpec:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    tp: TPAttention
    head: str = "classifier"  # the output head Torch-Pruning ignores
    side: int = SEQ  # sequence length (text) or image side (vision), for the table


def _ids(seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed))


def text_inputs() -> dict:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def t5_inputs() -> dict:
    return dict(text_inputs(), decoder_input_ids=_ids(seed=2))


def pixel_inputs() -> dict:
    return {"pixel_values": torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))}


def _tf():
    import transformers

    return transformers


ENC = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN)
TEXT = dict(ENC, vocab_size=VOCAB, max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2)  # grouped-query attention: 2 key/value heads for 4 query heads


def bert() -> nn.Module:
    return _tf().BertForSequenceClassification(_tf().BertConfig(**TEXT, num_labels=NUM_LABELS))


def roberta() -> nn.Module:
    return _tf().RobertaForSequenceClassification(_tf().RobertaConfig(**TEXT, num_labels=NUM_LABELS))


def gpt2() -> nn.Module:
    return _tf().GPT2LMHeadModel(
        _tf().GPT2Config(
            n_layer=LAYERS,
            n_embd=HIDDEN,
            n_head=HEADS,
            n_inner=FFN,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def llama() -> nn.Module:
    return _tf().LlamaForCausalLM(_tf().LlamaConfig(**DECODER))


def mistral() -> nn.Module:
    return _tf().MistralForCausalLM(_tf().MistralConfig(**DECODER, sliding_window=8))


def vit() -> nn.Module:
    return _tf().ViTForImageClassification(
        _tf().ViTConfig(**ENC, image_size=IMAGE, patch_size=8, num_labels=NUM_LABELS)
    )


def swin() -> nn.Module:
    return _tf().SwinForImageClassification(
        _tf().SwinConfig(
            image_size=IMAGE,
            patch_size=2,
            embed_dim=HIDDEN,
            depths=[LAYERS, LAYERS],
            num_heads=[HEADS, 2 * HEADS],
            window_size=4,
            num_labels=NUM_LABELS,
        )
    )


def t5() -> nn.Module:
    return _tf().T5ForConditionalGeneration(
        _tf().T5Config(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=HIDDEN // HEADS,
            d_ff=FFN,
            num_heads=HEADS,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            decoder_start_token_id=0,
        )
    )


_BERT_TP = TPAttention(
    "SelfAttention",
    ("query", "key", "value"),
    "num_attention_heads",
    head_dim_attrs=("attention_head_size",),
    all_head_attrs=("all_head_size",),
)
_QKV_PROJ = ("q_proj", "k_proj", "v_proj")
SPECS: dict[str, HFSpec] = {
    s.name: s
    for s in (
        HFSpec("bert", bert, text_inputs, _BERT_TP),
        HFSpec("roberta", roberta, text_inputs, _BERT_TP, head="classifier.out_proj"),
        HFSpec(
            "gpt2",
            gpt2,
            text_inputs,
            TPAttention(
                "GPT2Attention",
                ("c_attn",),
                "num_heads",
                head_dim_attrs=("head_dim",),
                all_head_attrs=("embed_dim",),
                split_attr="split_size",
            ),
            head="lm_head",
        ),
        HFSpec(
            "llama",
            llama,
            text_inputs,
            TPAttention("LlamaAttention", _QKV_PROJ, "config.num_attention_heads", "config.num_key_value_heads"),
            head="lm_head",
        ),
        HFSpec(
            "mistral",
            mistral,
            text_inputs,
            TPAttention("MistralAttention", _QKV_PROJ, "config.num_attention_heads", "config.num_key_value_heads"),
            head="lm_head",
        ),
        HFSpec(
            "vit",
            vit,
            pixel_inputs,
            TPAttention("ViTAttention", _QKV_PROJ, "num_attention_heads", head_dim_attrs=("head_dim",)),
            side=IMAGE,
        ),
        HFSpec(
            "swin",
            swin,
            pixel_inputs,
            TPAttention("SwinAttention", _QKV_PROJ, "num_attention_heads", head_dim_attrs=("head_dim",)),
            side=IMAGE,
        ),
        HFSpec(
            "t5",
            t5,
            t5_inputs,
            TPAttention(
                "T5Attention",
                ("q", "k", "v"),
                "n_heads",
                head_dim_attrs=("key_value_proj_dim",),
                all_head_attrs=("inner_dim",),
            ),
            head="lm_head",
        ),
    )
}
HF_MODELS = tuple(SPECS)
CONFIGS = (
    f"{LAYERS} layers (Swin: 2 stages of {LAYERS}), hidden {HIDDEN}, {HEADS} heads (Llama/Mistral: 2 key/value "
    f"heads), FFN {FFN}, vocab {VOCAB}; text: batch 1 x seq {SEQ} token ids + attention mask (T5: + decoder ids"
    f" of {SEQ}); vision: 1 x 3 x {IMAGE} x {IMAGE} (ViT patch 8, Swin patch 2, window 4); {NUM_LABELS} labels"
)


def build(name: str) -> tuple[nn.Module, dict]:
    """The model (random weights, seed 0, eval mode) and its example inputs."""
    spec = SPECS[name]
    torch.manual_seed(0)
    return spec.build().eval(), spec.inputs()


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2's transposed linear) by path."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def block_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The outermost ``nn.ModuleList``s: the encoder/decoder layer lists (``bert.encoder.layer``,
    ``transformer.h``, ``model.layers``, ``vit.layers``, ``swin.encoder.layers``, T5's ``encoder.block`` and
    ``decoder.block``), as parameter-name prefixes. The params ratio "over blocks" counts what is under them."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return tuple(n + "." for n in lists if not any(n.startswith(o + ".") for o in lists if o != n))


def block_params(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Parameters (tied ones once) whose names start with one of ``prefixes``."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def all_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one tensor (tied embeddings / lm_head), one list per shared tensor."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def untied(groups: list[list[str]], after: nn.Module) -> list[str]:
    """The tie groups (from ``tie_groups`` before pruning) whose names, where ``after`` still has them, no longer
    share one tensor: a tool replaced one of the tied parameters by a pruned copy."""
    params = dict(after.named_parameters(remove_duplicate=False))
    broken = []
    for group in groups:
        present = [n for n in group if n in params]
        if len({id(params[n]) for n in present}) > 1:
            broken.append("=".join(present))
    return broken
