"""trace_hf: tiny transformers models trace with every Linear/Conv1D visible, match the model, and get masked."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from sparsifx import PassError, TraceError, sparsify  # noqa: E402
from sparsifx.hf_tracing import trace_hf  # noqa: E402
from sparsifx.masking import bake_masks, is_masked, set_mask  # noqa: E402
from sparsifx.passes.magnitude import MagnitudePruning  # noqa: E402

V = 100
TEXT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=V)
DECODER = dict(TEXT, num_key_value_heads=2, max_position_embeddings=32)  # GQA: 2 key/value heads for 4 heads
VISION = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=8,
    num_labels=5,
)


def _ids(seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (2, seq), generator=torch.Generator().manual_seed(seed))


def _text() -> dict:
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pixels() -> dict:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


MODELS = {
    "bert": lambda: (transformers.BertForSequenceClassification(transformers.BertConfig(**TEXT)), _text()),
    "roberta": lambda: (
        transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**TEXT, max_position_embeddings=32)),
        _text(),
    ),
    "gpt2": lambda: (
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0
            )
        ),
        _text(),
    ),
    "llama": lambda: (transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)), _text()),
    "mistral": lambda: (
        transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER, sliding_window=4)),
        _text(),
    ),
    "vit": lambda: (transformers.ViTForImageClassification(transformers.ViTConfig(**VISION)), _pixels()),
    "swin": lambda: (
        transformers.SwinForImageClassification(
            transformers.SwinConfig(
                image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5
            )
        ),
        _pixels(),
    ),
    "t5": lambda: (
        transformers.T5ForConditionalGeneration(
            transformers.T5Config(
                vocab_size=V, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2
            )
        ),
        dict(_text(), decoder_input_ids=_ids(5, seed=2)),
    ),
}


def _build(name: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _visible(gm) -> set[str]:
    return {
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Linear, Conv1D))
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_traces_matches_and_magnitude_masks_every_layer(name):
    model, inputs = _build(name)
    gm = trace_hf(model, inputs)
    gm.graph.lint()
    assert gm.meta["opaque_leaves"] == [] and gm.meta["hf_trace_method"] == "fx"
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)[0], _logits(model, inputs))
    layers = _layers(model)
    assert _visible(gm) == set(layers) and len(layers) >= 9

    result = MagnitudePruning(sparsity=0.5)(gm)
    assert result.modified and result.gm is gm
    for layer_name in layers:
        layer = gm.get_submodule(layer_name)
        assert is_masked(layer), layer_name
        assert int((layer.mask == 0).sum()) == round(0.5 * layer.weight.numel()), layer_name
    # the masked graph computes the model with W*M; a tied layer (lm_head) is masked alone, so untie it there
    reference = dict(model.named_modules())
    with torch.no_grad():
        for layer_name, layer in gm.named_modules():
            if is_masked(layer):
                reference[layer_name].weight = nn.Parameter(reference[layer_name].weight * layer.mask)
        torch.testing.assert_close(gm(**inputs)[0], _logits(model, inputs))


def test_tied_weights_stay_tied_and_inputs_of_other_values_match():
    model, inputs = _build("gpt2")
    gm = trace_hf(model, {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"])})
    assert gm.lm_head.weight is gm.transformer.wte.weight
    assert isinstance(gm.get_submodule("transformer.h.0.attn.c_attn"), Conv1D)
    other = {"input_ids": _ids(seed=5), "attention_mask": inputs["attention_mask"]}  # padding it was not traced with
    with torch.no_grad():
        torch.testing.assert_close(gm(**other)[0], _logits(model, other))


def test_sparsify_recipe_masks_gpt2_conv1d_and_trains():
    model, inputs = _build("gpt2")
    gm = trace_hf(model, inputs)
    out = sparsify(gm, {"stages": [{"pass": "magnitude", "sparsity": 0.5}]}, example_inputs=tuple(inputs.values()))
    layers = _layers(out)
    assert len(layers) == 9 and all(is_masked(m) for m in layers.values())
    assert all(type(m).__name__ == "MaskedConv1D" for n, m in layers.items() if n != "lm_head")
    out.train()
    out(**inputs)[0].sum().backward()
    w = out.get_submodule("transformer.h.0.mlp.c_fc")
    assert w.weight.grad is not None and bool((w.weight.grad[w.mask == 0] == 0).all())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_method_folds_layers_back(name):
    model, inputs = _build(name)
    gm = trace_hf(model, inputs, method="export")
    gm.graph.lint()
    assert gm.meta["hf_trace_method"] == "export" and gm.meta["inlined_leaves"] == []
    assert _visible(gm) == set(_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)[0], _logits(model, inputs))
    assert MagnitudePruning(sparsity=0.5)(gm).modified
    assert all(is_masked(m) for m in _layers(gm).values())


def _conv1d_reference(x, w, b, mask):
    return x @ (w * mask) + b


@pytest.mark.parametrize("dense_grad", [False, True])
def test_masked_conv1d_forward_backward_and_bake(dense_grad):
    torch.manual_seed(0)
    root = nn.Sequential(Conv1D(12, 6))  # nf=12 outputs, nx=6 inputs: weight [6, 12]
    mask = (torch.rand(6, 12) < 0.4).float()
    layer = set_mask(root, "0", mask)
    layer.dense_grad = dense_grad
    assert isinstance(layer, Conv1D) and "density=" in repr(layer)
    x = torch.randn(2, 3, 6, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    y = layer(x)  # training path (recompute in backward)
    w_eff = w + (w * mask - w).detach() if dense_grad else w * mask
    y_ref = x @ w_eff + b
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    x_grad = x.grad.clone()
    x.grad = None
    y_ref.backward(g)
    torch.testing.assert_close(x_grad, x.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _conv1d_reference(x, layer.weight, layer.bias, mask))
    assert bake_masks(root) == 1 and type(root[0]) is Conv1D
    torch.testing.assert_close(root[0].weight, w.detach() * mask)
    with pytest.raises(PassError, match="does not match weight"):
        set_mask(root, "0", torch.ones(12, 6))


class _ValueBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1  # a branch on values: cannot be recorded


class _Branchy(nn.Module):
    def __init__(self, top_level_branch: bool = False):
        super().__init__()
        self.fc, self.inner, self.top = nn.Linear(4, 4), _ValueBranch(), top_level_branch

    def forward(self, x):
        if self.top and x.mean() > 0:
            x = x + 1
        return (self.fc(self.inner(x)),)


def test_value_branch_becomes_opaque_leaf_and_stays_exact():
    model = _Branchy().eval()
    gm = trace_hf(model, {"x": torch.ones(2, 4)})
    assert gm.meta["opaque_leaves"] == ["inner"]
    with torch.no_grad():  # the other branch is taken at run time
        torch.testing.assert_close(gm(-torch.ones(2, 4))[0], model(-torch.ones(2, 4))[0])


def test_errors_name_the_model_and_a_remedy():
    with pytest.raises(TraceError, match=r"_Branchy.*leaf_modules.*method='export'"):
        trace_hf(_Branchy(top_level_branch=True), {"x": torch.ones(2, 4)})
    with pytest.raises(TraceError, match="_Branchy.*non-empty dict"):
        trace_hf(_Branchy(), (torch.ones(2, 4),))
    with pytest.raises(TraceError, match="method must be one of"):
        trace_hf(_Branchy(), {"x": torch.ones(2, 4)}, method="jit")
    model, inputs = _build("bert")
    with pytest.raises(TraceError, match="BertForSequenceClassification.*torch.export failed.*method='fx'"):
        trace_hf(model, {"input_ids": inputs["input_ids"], "token_type_ids": "bad"}, method="export")


def test_sparsifx_does_not_import_transformers():
    code = (
        "import sys, sparsifx, sparsifx.masking, sparsifx.hf_tracing, sparsifx.passes.magnitude; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
