"""captions: the real training images as a text-to-image dataset, each captioned `a handwritten digit k` and
upsampled to teacher.mini.resolution (a `datasets` save_to_disk directory with text and image columns): the
prompts.source of a *-digits pipeline, so encode caches their prompts and real latents as for any dataset."""
from pathlib import Path

import numpy as np

from fewstep.data.sources import load_prepared
from fewstep.files import atomic_output
from fewstep.io import read_json, write_json
from fewstep.params import ParamsError
from fewstep.families.t2i import mini


def content_fingerprint(folder: Path) -> None:
    """`datasets` fingerprints a dataset made in memory at random; the saved one gets its content's digest, so the
    same images give the same bytes (and no needless rerun downstream)."""
    import xxhash

    state = read_json(folder / "state.json")
    digest = xxhash.xxh3_64()
    for entry in state["_data_files"]:
        digest.update((folder / entry["filename"]).read_bytes())
    write_json({**state, "_fingerprint": digest.hexdigest()}, folder / "state.json")


def main(params, args, device):
    if params.teacher.mini is None:
        raise ParamsError("teacher.mini is not set: captions are made for a teacher trained here")
    from datasets import Dataset, Features, Image as ImageFeature, Value, disable_progress_bars
    from PIL import Image

    disable_progress_bars()
    info, data = load_prepared(args.prepare, splits=("train",))
    images = mini.upsample(data["train_images"], params.teacher.mini.resolution)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    texts = [mini.caption(int(info["class_names"][k])) for k in data["train_labels"].tolist()]
    rows = {"text": texts, "image": [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]}
    with atomic_output(args.out) as out:
        Dataset.from_dict(rows, features=Features({"text": Value("string"), "image": ImageFeature()})).save_to_disk(str(out))
        content_fingerprint(out)
    print(f"[captions] {len(texts)} captioned images at {images.shape[-1]}x{images.shape[-1]} -> {args.out}", flush=True)


def configure(ap):
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("captions", main, configure)
