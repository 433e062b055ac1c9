"""Distances between two sets of images or their features, shared by the evaluate stage and the quality curves
that training logs: FID and KID (torchmetrics on features computed once), and a pixel-intensity view that no
featurizer shapes."""
from __future__ import annotations

import torch


class _Given(torch.nn.Module):
    """The 'feature network' of a torchmetrics FID/KID fed features computed once: it passes them on."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor, chunk: int = 500) -> float:
    """Fréchet distance of two feature sets (torchmetrics' FID on given features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # seconds to import: only evaluate pays

    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]), sync_on_compute=False)  # per process (curves under torchrun)
    for part, is_real in ((real, True), (fake, False)):
        for piece in part.split(chunk):  # the chunking of the featurizer's own batches: same sums, same FID
            metric.update(piece, real=is_real)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100) -> float:
    """Kernel Inception Distance (unbiased MMD², cubic polynomial kernel; torchmetrics), averaged over
    `subsets` random subsets as large as the smaller set. Unlike FID it has no bias from the sample count."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features": they are given
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets,
                                         subset_size=min(len(real), len(fake)), sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG: same sets, same KID, always
        torch.manual_seed(0)
        return float(metric.compute()[0])


def pixel_view(images: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """What a classifier's features may ignore: the 1-D Wasserstein distance of pixel intensities (in [0, 1])
    to the real images', and the share of faint pixels, in (0.03, 0.2) — background speckle."""
    from scipy.stats import wasserstein_distance

    fake = ((images.double() + 1) / 2).clamp(0, 1).flatten()
    ref = ((real.double() + 1) / 2).clamp(0, 1).flatten()
    return {"pixel_w1": float(wasserstein_distance(fake.numpy(), ref.numpy())),
            "pixel_faint": float(((fake > 0.03) & (fake < 0.2)).double().mean())}
