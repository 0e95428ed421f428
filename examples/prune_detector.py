"""Prune a torchvision detector's backbone and FPN through ``sparsify``; the detector keeps working.

    python examples/prune_detector.py [--size 320] [--ratio 0.5] [--onnx out/detector_backbone.onnx]

A whole detector does not trace: ``GeneralizedRCNN.forward`` iterates over its list of images and the
RPN/ROI heads branch on data (the TraceError says which node, and that no ``concrete_args`` fixes data). The
channels live in ``model.backbone`` (body + FPN): sparsify that submodule and put the result back. The FPN's
outputs feed the heads, so they are outputs of the traced module and keep all their channels (sparsifx never
prunes an output); everything inside is pruned, checked exact (``verify=True``: shrink == masked) after the
BatchNorm statistics are re-randomised, and exported to a verified ONNX file. The heads stay Python: exporting
the whole detector (data-dependent post-processing) is left to torchvision's own ONNX path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

import sparsifx


def randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms (constants hide pruning errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


def prune_detector(size: int = 320, ratio: float = 0.5, onnx_path: Path | None = None) -> dict:
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5
    ).eval()
    randomise_batchnorm(detector.backbone)
    x = torch.rand(1, 3, size, size)
    dense_features = detector.backbone(x)
    recipe = {"stages": [{"pass": "channel_prune", "ratio": ratio}, {"pass": "shrink"}]}
    pruned = sparsifx.sparsify(detector.backbone, recipe, example_inputs=(x,), verify=True)
    before = sum(p.numel() for p in detector.backbone.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    pruned_features = pruned(x)
    assert {k: v.shape for k, v in pruned_features.items()} == {k: v.shape for k, v in dense_features.items()}
    if onnx_path is not None:
        Path(onnx_path).parent.mkdir(parents=True, exist_ok=True)
        from sparsifx.backends.onnx_export import export_onnx

        export_onnx(pruned, onnx_path, (x,))
    detector.backbone = pruned
    with torch.no_grad():
        detections = detector([torch.rand(3, size, size)])
    return {
        "backbone_params_before": before,
        "backbone_params_after": after,
        "ratio": after / before,
        "feature_maps": {k: tuple(v.shape) for k, v in pruned_features.items()},
        "detections": {k: tuple(v.shape) for k, v in detections[0].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--onnx", type=Path, default=None)
    args = ap.parse_args()
    result = prune_detector(args.size, args.ratio, args.onnx)
    print(
        f"backbone+FPN parameters {result['backbone_params_before']:,} -> {result['backbone_params_after']:,} "
        f"({result['ratio']:.3f}); FPN outputs {result['feature_maps']}; detections {result['detections']}"
    )


if __name__ == "__main__":
    main()
