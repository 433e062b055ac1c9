"""The evaluation featurizer: a small classifier trained on real data by the prepare stage."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from fewstep.io import ConfiguredModule


class Featurizer(ConfiguredModule):
    """A small classifier trained on real data: penultimate features for FID / precision / recall,
    logits for conditioning accuracy. `num_features` lets torchmetrics use it as FID's feature module."""

    file_stem = "featurizer"

    def __init__(self, channels: int, num_classes: int, features: int = 128):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "features": features}
        self.num_features = features
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, features), nn.SiLU(),
        )
        self.head = nn.Linear(features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Features of many images, in batches."""
        return torch.cat([self(chunk) for chunk in images.split(batch_size)])

    @classmethod
    def load(cls, path: Path) -> "Featurizer":
        return super().load(path).eval()
