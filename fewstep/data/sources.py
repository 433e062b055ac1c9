"""Real data: load a source, resize, scale to [-1, 1], split into train and held-out test."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.errors import DataError
from fewstep.io import ArtifactError, load_tensors, read_json


@dataclass
class Dataset:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 in [0, num_classes)
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images[:, None].astype(np.float32) / 16.0
    return images, digits.target.astype(np.int64), [str(i) for i in range(10)]


def _from_hf(ds, image_column: str, label_column: str, source: str):
    from datasets import ClassLabel

    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise DataError(f"{source}: no column {column!r} (columns: {ds.column_names}); set data.image_column / data.label_column")
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty")
    feature = ds.features[label_column]
    labels = np.asarray(ds[label_column], dtype=np.int64)
    if labels.min() < 0:
        raise DataError(f"{source}: column {label_column!r} holds a negative label ({labels.min()}); "
                        f"every image needs a class")
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    if labels.max() >= len(names):
        raise DataError(f"{source}: column {label_column!r} holds label {labels.max()}, but there are only "
                        f"{len(names)} class names")
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(f"{source}: every image has the same label ({int(present[0])}); "
                        f"a class-conditional model needs at least 2 classes")
    pil_images = _decode_images(ds, image_column, source)
    mode = "L" if all(im.mode in ("L", "1", "I", "I;16") for im in pil_images) else "RGB"
    sizes = {im.size for im in pil_images}
    if len(sizes) > 1:
        # Mixed sizes: bring everything to the largest one before the common resize.
        target = max(sizes)
        pil_images = [im.resize(target) for im in pil_images]
    arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in pil_images]
    images = np.stack(arrays)
    images = images[:, None] if mode == "L" else images.transpose(0, 3, 1, 2)
    return images, labels, names


def read_image(row: dict, what: str, where: str):
    """The PIL image of an undecoded `datasets` Image row (its bytes, or its file), loaded now so that an
    unreadable one is one line: "<what>: <where> is not a readable image (<error>)"."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(row["bytes"]) if row.get("bytes") else row["path"])
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{what}: {where} is not a readable image ({type(exc).__name__})") from None
    return image


def _decode_images(ds, column: str, source: str) -> list:
    """PIL images of `column`, decoded here so that an unreadable one is named (file or row) in one line."""
    from datasets import Image as ImageFeature

    if not isinstance(ds.features[column], ImageFeature):
        return list(ds[column])
    folder = Path(source).resolve() if Path(source).is_dir() else None
    images = []
    for i, row in enumerate(ds.cast_column(column, ImageFeature(decode=False))[column]):
        where = row.get("path") or f"row {i}"
        if folder is not None and Path(where).is_relative_to(folder):
            where = Path(where).relative_to(folder).as_posix()
        images.append(read_image(row, source, where))
    return images


def _image_folder(path: Path, image_column: str, label_column: str):
    from datasets import load_dataset
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    subdirs = [p for p in path.iterdir() if p.is_dir()]
    if not subdirs:
        raise DataError(f"{path}: an image folder needs one sub-folder per class, found none")
    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    classes = sorted(d.name for d in subdirs if any(f.suffix.lower() in extensions for f in d.rglob("*") if f.is_file()))
    if not classes:
        raise DataError(f"{path}: its {len(subdirs)} class sub-folder(s) hold no images (.png, .jpg, ...)")
    if len(classes) < 2:
        raise DataError(f"{path}: only one class sub-folder holds images ({classes[0]}); "
                        f"a class-conditional model needs at least 2 classes")
    ds = load_dataset("imagefolder", data_dir=str(path), split="train")
    return _from_hf(ds, "image", "label", str(path))


def read_saved_dataset(path: Path, key: str):
    """A `datasets` save_to_disk directory as one split ("train" if it has one); `key` names the params
    key that pointed here, for the error line."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a corrupt directory
        raise DataError(f"{key}: {path} is not a readable `datasets` save_to_disk directory ({exc})") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _saved_dataset(path: Path, image_column: str, label_column: str):
    return _from_hf(read_saved_dataset(path, "data.source"), image_column, label_column, str(path))


def load_source(source: str, image_column: str = "image", label_column: str = "label"):
    """Return (images in [0, 1] as (N, C, H, W) float32, labels, class names)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if source == "digits":
        return _digits()
    path = Path(source)
    if not path.exists():
        raise DataError(f"data.source: {source!r} is neither 'digits' nor an existing path")
    if not path.is_dir():
        raise DataError(f"data.source: {source} must be a directory (image folder or save_to_disk dataset)")
    import datasets

    datasets.disable_progress_bars()  # a stage's stderr is for its own progress and its one error line
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _saved_dataset(path, image_column, label_column)
    return _image_folder(path, image_column, label_column)


def load_dataset(source: str, resolution: int, image_column: str = "image", label_column: str = "label") -> Dataset:
    images, labels, names = load_source(source, image_column, label_column)
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return Dataset(x, torch.from_numpy(labels), names)


def split(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    n = len(data.labels)
    n_test = int(round(n * test_fraction))
    if n_test < 2 or n - n_test < 2:
        raise DataError(f"data: {n} images are too few to hold out {test_fraction:.0%} for evaluation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    pick = lambda idx: Dataset(data.images[idx].contiguous(), data.labels[idx].contiguous(), data.class_names)
    return pick(train), pick(test)


def load_prepared(prepare_dir: str | Path, splits: tuple[str, ...] = ("train",)) -> tuple[dict, dict[str, torch.Tensor]]:
    """The prepare stage's info.json and its `<split>_images` / `<split>_labels` tensors, checked against
    each other: images float (N, channels, resolution, resolution), labels int64 (N,) in [0, classes)."""
    prepare_dir = Path(prepare_dir)
    info_file, data_file = prepare_dir / "info.json", prepare_dir / "data.safetensors"
    info = read_json(info_file)
    for key, kind in (("resolution", int), ("channels", int), ("class_names", list)):
        if not isinstance(info, dict) or not isinstance(info.get(key), kind):
            got = info.get(key) if isinstance(info, dict) else info
            raise ArtifactError(f"{info_file}: {key!r} must be a {kind.__name__}, got {got!r}")
    c, r, k = info["channels"], info["resolution"], len(info["class_names"])
    tensors = load_tensors(data_file, required=tuple(f"{s}_{t}" for s in splits for t in ("images", "labels")))
    for split_name in splits:
        images, labels = tensors[f"{split_name}_images"], tensors[f"{split_name}_labels"]
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, r, r) or not images.is_floating_point():
            raise ArtifactError(f"{data_file}: {split_name}_images is {str(images.dtype).removeprefix('torch.')} "
                                f"{list(images.shape)}, expected float [N, {c}, {r}, {r}] as {info_file} says")
        if tuple(labels.shape) != (len(images),) or labels.dtype != torch.int64:
            raise ArtifactError(f"{data_file}: {split_name}_labels is {str(labels.dtype).removeprefix('torch.')} "
                                f"{list(labels.shape)}, expected int64 [{len(images)}] (one per image)")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ArtifactError(f"{data_file}: {split_name}_labels range over [{int(labels.min())}, {int(labels.max())}], "
                                f"expected [0, {k - 1}] for the {k} classes in {info_file}")
    return info, tensors
