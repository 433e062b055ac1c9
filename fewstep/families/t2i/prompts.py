"""Prompts (and optional real images) from a text file or a `datasets` dataset, split train / held-out."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.data.sources import DataError, read_saved_dataset


@dataclass
class Prompts:
    texts: list[str]
    images: list | None = None  # PIL images aligned with texts, when the source has an image column

    def pick(self, index: list[int]) -> "Prompts":
        return Prompts([self.texts[i] for i in index], None if self.images is None else [self.images[i] for i in index])


def _text_file(path: Path) -> Prompts:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"prompts.source: {path} is not a UTF-8 text file") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"prompts.source: {path} has no prompts (the file is empty; write one prompt a line)")
    return Prompts(texts)


def _dataset(path: Path, text_column: str, image_column: str | None) -> Prompts:
    ds = read_saved_dataset(path, "prompts.source")
    for key, column in (("text_column", text_column), ("image_column", image_column)):
        if column is not None and column not in ds.column_names:
            raise DataError(f"prompts.{key}: {path} has no column {column!r} (columns: {ds.column_names})")
    texts = [str(t).strip() for t in ds[text_column]]
    if not texts or not all(texts):
        raise DataError(f"prompts.source: {path} has {'no rows' if not texts else 'empty prompts'} "
                        f"in column {text_column!r}")
    return Prompts(texts, list(ds[image_column]) if image_column else None)


def load_prompts(source: str, text_column: str = "text", image_column: str | None = None) -> Prompts:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path = Path(source)
    if not path.exists():
        raise DataError(f"prompts.source: {source} does not exist (a text file or a save_to_disk dataset directory)")
    if path.is_file():
        if image_column is not None:
            raise DataError(f"prompts.image_column: {source} is a text file without images; set it to null")
        return _text_file(path)
    return _dataset(path, text_column, image_column)


def split(prompts: Prompts, eval_count: int, seed: int, max_prompts: int = 0) -> tuple[Prompts, Prompts]:
    """A seeded shuffle, then the first `eval_count` prompts are held out for evaluation."""
    n = len(prompts.texts)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if max_prompts:
        order = order[:max_prompts]
    if len(order) <= eval_count:
        raise DataError(f"prompts: {len(order)} prompts are too few to hold out prompts.eval_count={eval_count} "
                        f"for evaluation and still train on some")
    return prompts.pick(order[eval_count:]), prompts.pick(order[:eval_count])


def image_tensor(images: list, resolution: int) -> torch.Tensor:
    """PIL images -> (N, 3, R, R) in [-1, 1]: resize the short side to R, then center-crop."""
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)
