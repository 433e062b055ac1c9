"""Evaluation metrics on the featurizer's features: FID (torchmetrics), k-NN precision/recall,
conditioning accuracy, and per-image latency."""
from __future__ import annotations

import time
from typing import Callable

import torch

from .models import Featurizer


class Evaluator:
    """Scores image sets against one fixed held-out real set with one featurizer."""

    def __init__(self, featurizer: Featurizer, real_images: torch.Tensor, k: int = 3, batch_size: int = 500):
        from torchmetrics.image.fid import FrechetInceptionDistance  # seconds to import: only evaluate pays

        self.featurizer, self.k, self.batch_size = featurizer.eval(), k, batch_size
        self.fid = FrechetInceptionDistance(feature=featurizer, reset_real_features=False)
        for chunk in real_images.split(batch_size):
            self.fid.update(chunk, real=True)
        self.real_features = featurizer.embed(real_images, batch_size)

    @torch.no_grad()
    def fid_of(self, images: torch.Tensor) -> float:
        self.fid.reset()  # keeps the real statistics (reset_real_features=False)
        for chunk in images.split(self.batch_size):
            self.fid.update(chunk, real=False)
        return float(self.fid.compute())

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        fake = self.featurizer.embed(images, self.batch_size)
        precision, recall = precision_recall(self.real_features, fake, self.k)
        out = {"fid": self.fid_of(images), "precision": precision, "recall": recall}
        if labels is not None:
            logits = torch.cat([self.featurizer.head(f) for f in fake.split(self.batch_size)])
            out["cond_accuracy"] = float((logits.argmax(1) == labels).float().mean())
        return out


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own nearest neighbour


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = share of fake samples inside the real manifold (union of
    k-NN balls around real features); recall = share of real samples inside the fake manifold."""
    real, fake = real.double(), fake.double()
    d = torch.cdist(fake, real)
    precision = (d <= _knn_radii(real, k)[None, :]).any(dim=1).double().mean()
    recall = (d.T <= _knn_radii(fake, k)[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def latency_ms(generate: Callable[[], torch.Tensor], batch: int, repeats: int = 3) -> float:
    """Median wall time per image (ms) of `generate()` producing `batch` images, after one warm-up."""
    generate()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / batch * 1e3
