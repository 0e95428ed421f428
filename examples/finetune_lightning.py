"""Train a sparsified small CNN with Lightning, then export it to ONNX.

    python examples/finetune_lightning.py --steps 30

The CNN is sparsified with a RigL stage and held by a ``LightningModule``; ``SparsifxCallback`` attaches RigL's
controller to the module's optimizer when training starts. Lightning calls ``optimizer.step(closure)`` with the
forward and backward inside the closure; the callback runs the closure before the controller's step hook, so
RigL's regrowth sees this step's gradients, as in a plain loop. The data is generated: 8x8 images whose label
is the quadrant holding a bright spot. Needs ``pip install sparsifx[lightning]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import sparsifx
from sparsifx.integrations.lightning import SparsifxCallback


def spots(n: int, seed: int = 0) -> TensorDataset:
    """8x8 noise images with a bright 2x2 spot; label = the spot's quadrant (0-3)."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.8 * torch.randn(n, 1, 8, 8, generator=gen)
    label = torch.randint(0, 4, (n,), generator=gen)
    for i, q in enumerate(label.tolist()):
        r, c = 4 * (q // 2) + 1, 4 * (q % 2) + 1
        x[i, 0, r : r + 2, c : c + 2] += 1.0
    return TensorDataset(x, label)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the ONNX file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    recipe = {"stages": [{"pass": "rigl", "sparsity": args.sparsity, "delta_t": max(1, args.steps // 4)}]}
    net = sparsifx.sparsify(cnn(), recipe, example_inputs=(x,))
    loader = DataLoader(spots(32 * 16), batch_size=32, shuffle=True)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        callbacks=[SparsifxCallback()],
    )
    trainer.fit(Classifier(net), loader)

    summary = sparsifx.passes.training.controller(net).summary()
    density = sum(summary["density"].values()) / len(summary["density"])
    print(
        f"trained {summary['step']} steps, loss {float(trainer.callback_metrics['loss']):.3f}; "
        f"RigL updates {summary['updates']}, mean density {density:.3f} over {len(summary['density'])} layers"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = sparsifx.export_onnx(net.eval(), args.out / "cnn_rigl.onnx", (x,))
    print(f"wrote {path} (onnxruntime matches torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
