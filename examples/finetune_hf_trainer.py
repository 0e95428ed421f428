"""Fine-tune a sparsified tiny BERT with the transformers ``Trainer``, then export it to ONNX.

    python examples/finetune_hf_trainer.py --steps 20

The model is a 2-layer BERT built from a config (random weights, nothing downloaded), traced with
``sparsifx.hf_tracing.trace_hf`` and sparsified with a RigL stage; ``Trainer`` needs a model that returns its
loss, so a small wrapper adds one. ``SparsifxCallback`` attaches RigL's controller to the optimizer inside
Trainer's ``AcceleratedOptimizer``; every ``optimizer.step()`` then keeps the masks and, every ``delta_t``
steps, drops and regrows weights. The data is generated: label = whether token 1 occurs in the sequence.
Needs ``pip install sparsifx[hf] accelerate``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsifx
from sparsifx.hf_tracing import trace_hf
from sparsifx.integrations.hf import SparsifxCallback

BATCH, SEQ, VOCAB = 8, 16, 50


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; label 1 when token 1 occurs."""

    def __init__(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, SEQ), generator=gen)
        hit = torch.rand(n, generator=gen) < 0.5
        self.ids[hit, torch.randint(0, SEQ, (int(hit.sum()),), generator=gen)] = 1
        self.labels = hit.long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class WithLoss(nn.Module):
    """``Trainer`` wants ``{"loss": ..., "logits": ...}``; the traced graph returns ``(logits,)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(input_ids)[0]
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the ONNX file")
    args = parser.parse_args(argv)
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    data = Tokens(BATCH * 16)
    example = data.ids[:BATCH]  # trace_hf specialises the graph to this shape: batches must match it
    gm = trace_hf(tiny_bert(), {"input_ids": example})
    recipe = {
        "stages": [
            {
                "pass": "rigl",
                "sparsity": args.sparsity,
                "delta_t": max(1, args.steps // 4),
                "types": ["Linear"],
                "ignore": ["classifier"],
            }
        ]
    }
    gm = sparsifx.sparsify(gm, recipe, example_inputs=(example,))
    model = WithLoss(gm).train()

    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=BATCH,
            dataloader_drop_last=True,
            learning_rate=2e-3,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=not sys.stderr.isatty(),
        )
        trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[SparsifxCallback()])
        result = trainer.train()

    summary = sparsifx.passes.training.controller(gm).summary()
    density = sum(summary["density"].values()) / len(summary["density"])
    print(
        f"trained {summary['step']} steps, loss {result.training_loss:.3f}; RigL updates {summary['updates']}, "
        f"mean density {density:.3f} over {len(summary['density'])} layers"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = sparsifx.export_onnx(gm.eval(), args.out / "bert_rigl.onnx", (example,), dynamic_batch=False)
    print(f"wrote {path} (onnxruntime matches torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
