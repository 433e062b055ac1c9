"""Sample grids as PNG, and the scoring stages' outputs (grids + metrics.json)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep.files import atomic_output
from fewstep.io import write_json


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int | None = None,
              row_labels: list[str] | None = None) -> None:
    """Tile (N, C, H, W) images in [-1, 1] into a PNG, `nrow` per row, upscaled so small images stay visible;
    `row_labels`: one text per row, written in a margin on the left."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    scale = scale or max(1, 64 // max(h, w))
    canvas = torch.full((c, nrows * (h + 1) + 1, ncol * (w + 1) + 1), -1.0)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = img
    array = ((canvas + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    array = np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)
    mode = "L" if c == 1 else "RGB"
    image = Image.fromarray(array[..., 0] if c == 1 else array, mode=mode)
    if row_labels:
        image = _label_rows(image, row_labels, (h + 1) * scale)
    image.save(path)


def _label_rows(image: Image.Image, labels: list[str], row_height: int) -> Image.Image:
    """The grid with a white margin on its left holding each row's label, vertically centred on the row."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(10, min(16, row_height // 3)))
    probe = ImageDraw.Draw(image)
    width = max(probe.textbbox((0, 0), text, font=font)[2] for text in labels) + 12
    labelled = Image.new(image.mode, (image.width + width, image.height), 255 if image.mode == "L" else (255,) * 3)
    labelled.paste(image, (width, 0))
    draw = ImageDraw.Draw(labelled)
    for r, text in enumerate(labels):
        draw.text((6, r * row_height + row_height // 2), text, fill=0 if image.mode == "L" else (0,) * 3,
                  font=font, anchor="lm")
    return labelled


#: What `dvc metrics show` and `dvc exp show` print per model (the headline folder); metrics.json has the rest.
HEADLINE = ("fid", "fid_low", "fid_high", "kid", "fid_t", "pixel_w1", "latency_ms", "nfe", "speedup")


def write_scores(samples_dir: Path, metrics_file: Path, grids: dict[str, torch.Tensor], grid_size: int, metrics: dict,
                 captions: list[str] | None = None, headline_dir: Path | None = None, student: str = "") -> None:
    """What evaluate and benchmark write: one grid per model (`grid_size` a row; "student@4" -> student_4.png),
    the grids' prompts for text-to-image (prompts.json), the metrics, and (`headline_dir`) one small file per
    model with its HEADLINE numbers (the `student` row as student.json); each output whole or not at all."""
    with atomic_output(samples_dir) as out:
        out.mkdir()
        for name, images in grids.items():
            save_grid(images, out / f"{name.replace('@', '_')}.png", nrow=min(grid_size, len(images)))
        if captions is not None:
            write_json({"prompts": captions}, out / "prompts.json")
    if headline_dir is not None:
        with atomic_output(headline_dir) as out:
            out.mkdir()
            for name, row in headline(metrics, student).items():
                write_json(row, out / f"{name}.json")
    with atomic_output(metrics_file) as out:
        write_json(metrics, out)


def headline(metrics: dict, student: str) -> dict[str, dict]:
    """Per model of metrics.json holding an FID, its HEADLINE numbers: the FID's 95% interval as two numbers (DVC's
    tables show no lists), the speedup on the student's row. The student (`student`, e.g. "student@4") is named
    `student`, so the files are the same for every student_steps (dvc.yaml lists them); its fewer-step subsets
    stay in metrics.json."""
    rows = {}
    for name, row in metrics.items():
        if not isinstance(row, dict) or "fid" not in row or (name.startswith("student") and name != student):
            continue
        flat = {**row, **dict(zip(("fid_low", "fid_high"), row.get("fid_ci95") or ()))}
        if name == student and "latency_ms" in row and "latency_ms" in metrics.get("teacher", {}):
            flat["speedup"] = metrics["teacher"]["latency_ms"] / row["latency_ms"]
        rows["student" if name == student else name] = {key: flat[key] for key in HEADLINE if key in flat}
    return rows
