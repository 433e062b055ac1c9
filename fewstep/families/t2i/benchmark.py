"""DMD2's text-to-image protocol on a user's local caption/image pairs (COCO-2014: 10k at 512 px for SDXL, 30k
at 256 px for SD1.5): one image per caption from the student (and the teacher), FID against the captions' own
images in an Inception-compatible featurizer's space, CLIP score against the captions — each with core.metrics'
95% interval (over benchmark.seeds sampling seeds; CLIP score with one seed: over the images).

Generated and reference images go through the same resize (to uint8, PIL bicubic on the short side, center
crop to `benchmark.resolution`) before the featurizer, as clean-fid does; CLIP sees the generated images at
their own size. Everything streams batch by batch: only features and per-image scores stay in memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.errors import DataError
from fewstep.core.distances import fid, kid
from fewstep.core.metrics import over_seeds
from fewstep.families.t2i.t2i_evaluation import per_image_mean, uint8
from fewstep.families.t2i.prompts import image_tensor


@dataclass
class CaptionedImages:
    """The chosen caption/image pairs: captions in memory, images decoded a batch at a time."""

    dataset: object  # a `datasets.Dataset`, already narrowed to the chosen rows
    texts: list[str]
    image_column: str

    def images(self, start: int, stop: int) -> list:
        """PIL images of pairs start..stop-1; an unreadable file is one error line naming it."""
        from datasets import Image as ImageFeature

        from fewstep.data.sources import read_image

        rows = self.dataset.select(range(start, stop)).cast_column(self.image_column, ImageFeature(decode=False))
        return [read_image(row, "benchmark.source", row.get("path") or "a row") for row in rows[self.image_column]]


def load_pairs(source: str, text_column: str, image_column: str, count: int, seed: int) -> CaptionedImages:
    """`count` pairs (0: all) of a local `imagefolder` (images + metadata.jsonl with file_name and a caption
    column) or a `datasets` save_to_disk directory, drawn by a seeded shuffle."""
    import datasets

    from fewstep.data.sources import read_saved_dataset

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets.disable_progress_bars()
    path = Path(source)
    if not path.is_dir():
        raise DataError(f"benchmark.source: {source} is not a folder (an imagefolder with metadata.jsonl, or a "
                        f"save_to_disk dataset)")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = read_saved_dataset(path, "benchmark.source")
    elif not any(path.rglob("metadata.jsonl")) and not any(path.rglob("metadata.csv")):
        raise DataError(f"benchmark.source: {source} has no metadata.jsonl (one line per image: "
                        f'{{"file_name": ..., "{text_column}": ...}}) and is not a save_to_disk dataset')
    else:
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    for key, column in (("text_column", text_column), ("image_column", image_column)):
        if column not in ds.column_names:
            raise DataError(f"benchmark.{key}: {source} has no column {column!r} (columns: {ds.column_names})")
    if len(ds) < 2:
        raise DataError(f"benchmark.source: {source} holds {len(ds)} caption/image pairs; FID needs at least 2")
    if count > len(ds):
        raise DataError(f"benchmark.count: {count} pairs asked for, {source} holds {len(ds)} (0 = all of them)")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()[:count or len(ds)]
    ds = ds.select(order)
    texts = [str(t).strip() for t in ds[text_column]]
    if not all(texts):
        raise DataError(f"benchmark.source: {source} has empty captions in column {text_column!r}")
    return CaptionedImages(ds, texts, image_column)


def resized(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Generated images in [-1, 1] brought to the reference images' treatment: uint8, then image_tensor's
    bicubic resize and center crop."""
    from PIL import Image

    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in uint8(images)]
    return image_tensor(pil, resolution)


@dataclass
class ModelScores:
    """What the benchmark keeps of one model's images: featurizer features, per-image CLIP scores, a few images."""

    features: list[torch.Tensor] = field(default_factory=list)
    clip: list[torch.Tensor] = field(default_factory=list)
    grid: list[torch.Tensor] = field(default_factory=list)

    def add(self, images, texts: list[str], net, clip, resolution: int, keep: int, device) -> None:
        """One batch: generated images ((N, 3, H, W) in [-1, 1]) or the reference's PIL images. Both reach the
        featurizer through the same resize; CLIP sees generated images at their own size."""
        from fewstep.families.t2i.t2i_evaluation import embed

        real = isinstance(images, list)
        at_resolution = image_tensor(images, resolution) if real else resized(images, resolution)
        shown = at_resolution if real else images
        if net is not None:
            self.features.append(embed(net, at_resolution, len(at_resolution), device))
        if clip is not None:
            self.clip.append(clip(shown, texts))
        room = keep - sum(len(g) for g in self.grid)
        if room > 0:
            self.grid.append(shown[:room].cpu())


def scores_over_seeds(runs: list[ModelScores], reference: ModelScores) -> dict:
    """One model's FID and KID against the reference images, and its CLIP score, per sampling seed, as means with
    95% intervals over the seeds (core.metrics' scheme); with one seed, CLIP score's interval is over the images."""
    values = {}
    if reference.features:
        real = torch.cat(reference.features)
        values["fid"] = [fid(real, torch.cat(run.features)) for run in runs]
        values["kid"] = [kid(real, torch.cat(run.features), subsets=10) for run in runs]
    if runs[0].clip:
        values["clip_score"] = [per_image_mean(torch.cat(run.clip))[0] for run in runs]
    out = over_seeds(values)
    if runs[0].clip and len(runs) == 1:
        out["clip_score_ci95"] = per_image_mean(torch.cat(runs[0].clip))[1]
    return out
