"""DELTA's term at step 0 on the embedded default, per tapped layer: what BatchNorm statistics alone make.

The target equals the source (step 0); the source normalises with its ImageNet running statistics (the
authors') or with the batch's. Prints, per layer, the source's summed squared activation (the relative
term's denominator), the official summed term at alpha 1 and the relative one, and the cross-entropy of
the new head on the same batch: Fashion-MNIST-30, seed 0, the first 32 training images with the training
augmentation, 96 px.

    .venv/bin/python evidence/statistics_gap.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatl.config import TrainConfig
from deltatl.data import TransformedImages
from deltatl.data.transforms import train_transform
from deltatl.engine.objective import Objective
from deltatl.models import preprocessing
from deltatl.regularizers import source_energy
from deltatl.run import delta_layers, open_splits, seeded_model


def main() -> None:
    config = TrainConfig(method="delta-noatt", val_per_class=20, test_per_class=300)
    splits = open_splits(config, progress=False)
    model = seeded_model(config, len(splits.classes))
    layers = delta_layers(config, model)
    train = TransformedImages(splits.train, train_transform(config.image_size, preprocessing(model)), seed=0)
    images = torch.stack([train[i][0] for i in range(32)])
    labels = torch.tensor([train[i][1] for i in range(32)])
    print(f"{'layer':<22} {'shape':<18} {'energy':>10} {'gap (sum)':>10} {'gap (relative)':>15}")
    totals = {"sum": 0.0, "relative": 0.0}
    for name in layers:
        gaps = {}
        for reduction in totals:
            objective = Objective(model, "delta-noatt", alpha=1.0, layers=[name], reduction=reduction)
            gaps[reduction] = objective.statistics_gap(images).item()
            totals[reduction] += gaps[reduction]
        features = objective.source_features(images)[name]
        print(f"{name:<22} {str(tuple(features.shape)):<18} {source_energy(features).item():>10.1f} "
              f"{gaps['sum']:>10.1f} {gaps['relative']:>15.3f}")
    with torch.no_grad():
        ce = F.cross_entropy(model.train()(images), labels).item()
    print(f"{'all layers':<40} {'':>10} {totals['sum']:>10.1f} {totals['relative']:>15.3f}")
    print(f"cross-entropy of the new head on the batch: {ce:.3f}")


if __name__ == "__main__":
    main()
