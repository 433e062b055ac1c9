"""The evaluate stage's metrics: FID, KID (fewstep.core.distances) and the pixel view per sampling seed, summarized
with 95% intervals over the seeds; k-NN precision/recall, conditioning accuracy; per-image latency.

One interval scheme, in every family and stage (evaluate, compare, the text-to-image benchmark): a 95%
t-interval of a mean over independent replicates (`mean_interval`). A set-level score (FID, KID, precision,
recall, pixel W1) has one replicate per sampling seed, so it gets an interval only with two or more seeds, never
from a bootstrap over images (duplicate draws shift FID upwards). A per-image score (CLIP score) is itself a
mean over independent images: with one seed its replicates are the images, with several the seeds."""
from __future__ import annotations

from typing import Protocol

import torch

from fewstep.core.distances import fid, kid, pixel_view


class Featurizer(Protocol):
    """What the Evaluator needs of a family's classifier (fewstep.data.featurizer.Featurizer is one): features
    for FID/KID and k-NN, and the class head on them for conditioning accuracy."""

    def eval(self) -> "Featurizer": ...
    def embed(self, images: torch.Tensor, batch_size: int) -> torch.Tensor: ...
    def head(self, features: torch.Tensor) -> torch.Tensor: ...


def mean_interval(values) -> list[float] | None:
    """95% t-interval of the mean of independent replicates (a list or tensor; None with fewer than two).
    For FID the replicates are sampling seeds, not a bootstrap over images: every model is scored against the
    same reference images, so the reference's own noise is common to the rows being compared; and a bootstrap's
    duplicate draws shift FID upwards (on 359 reference images in 128 dimensions, by more than the differences
    between models)."""
    from scipy.stats import t

    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(v) < 2:
        return None
    half = float(t.ppf(0.975, len(v) - 1) * v.std() / len(v) ** 0.5)
    return [float(v.mean()) - half, float(v.mean()) + half]


def over_seeds(values: dict[str, list[float]], suffix: str = "") -> dict:
    """Per-sampling-seed values of each metric ({"fid": [...], "kid": [...]}) as their means over the seeds and
    95% t-intervals. `suffix` "_t": scores against the teacher's own samples (FID-T, KID-T)."""
    out = {}
    for name, per_seed in values.items():
        out[f"{name}{suffix}"] = sum(per_seed) / len(per_seed)
        if (interval := mean_interval(per_seed)) is not None:
            out[f"{name}{suffix}_ci95"] = interval
    return out


def fid_kid(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[float]]:
    """FID and KID of (reference, sample) feature pairs, one pair per sampling seed."""
    return {"fid": [fid(r, f) for r, f in pairs], "kid": [kid(r, f) for r, f in pairs]}


def differ(a: dict, b: dict, key: str = "fid") -> bool:
    """Whether two rows of metrics.json differ in `key` beyond their 95% intervals (the intervals do not
    overlap: conservative, as a comparison should be when each row is one training run). Rows without an
    interval (one sampling seed) never differ."""
    if not a.get(f"{key}_ci95") or not b.get(f"{key}_ci95"):
        return False
    (a_low, a_high), (b_low, b_high) = a[f"{key}_ci95"], b[f"{key}_ci95"]
    return a_high < b_low or b_high < a_low



class Evaluator:
    """Scores image sets against one fixed held-out real set with one featurizer."""

    def __init__(self, featurizer: Featurizer, real_images: torch.Tensor, k: int = 3, batch_size: int = 500):
        self.featurizer, self.k, self.batch_size = featurizer.eval(), k, batch_size
        self.real_images = real_images
        self.real_features = featurizer.embed(real_images, batch_size)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.featurizer.embed(images, self.batch_size)

    @torch.no_grad()
    def fid_of(self, images: torch.Tensor) -> float:
        return fid(self.real_features, self.features(images), self.batch_size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None,
              fake: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics of one image set; `fake`: its features, when the caller already has them."""
        fake = self.features(images) if fake is None else fake
        precision, recall = precision_recall(self.real_features, fake, self.k)
        out = {"fid": fid(self.real_features, fake, self.batch_size), "precision": precision, "recall": recall}
        if labels is not None:
            logits = torch.cat([self.featurizer.head(f) for f in fake.split(self.batch_size)])
            out["cond_accuracy"] = float((logits.argmax(1) == labels).float().mean())
        return {**out, **pixel_view(images, self.real_images)}


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


def latency_ms(timings: list[float]) -> float:
    """A model's latency in every pipeline's metrics: the median wall time per image (ms) over the batches it
    generated (`fewstep.core.sampling.batched(..., timings=)`), all of the evaluation's batch size, in one process."""
    return float(torch.tensor(timings).median())
