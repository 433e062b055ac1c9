"""prepare: real data -> train / held-out test splits, the evaluation featurizer, reference features."""
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fewstep.data import sources
from fewstep.core import runtime
from fewstep.params import EDM, TEXT_TO_IMAGE
from fewstep.files import atomic_output
from fewstep.io import save_tensors, write_json
from fewstep.data.featurizer import Featurizer


def train_featurizer(train: sources.Dataset, test: sources.Dataset, p, generator) -> tuple[Featurizer, float]:
    """A small classifier on real training images; small random shifts keep its features smooth."""
    model = Featurizer(train.images.shape[1], train.num_classes, p.features)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.steps)
    pad = max(1, train.images.shape[-1] // 8)
    for _ in tqdm(range(p.steps), desc="featurizer", unit="step", mininterval=1.0):
        idx = torch.randint(len(train.labels), (p.batch_size,), generator=generator)
        x = F.pad(train.images[idx], (pad,) * 4, mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        x = x[..., dy:dy + train.images.shape[-2], dx:dx + train.images.shape[-1]]
        loss = F.cross_entropy(model.logits(x), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model.logits(test.images).argmax(1) == test.labels).float().mean())
    return model, accuracy


def main(params, args, device):
    p = params.data
    print(f"[prepare] loading {p.source!r} at {p.resolution}x{p.resolution}", flush=True)
    full = sources.load_dataset(p.source, p.resolution, p.image_column, p.label_column)
    train, test = sources.split(full, p.test_fraction, params.seed)
    featurizer, accuracy = train_featurizer(train, test, params.featurizer, runtime.seeded(params.seed, "featurizer"))
    with atomic_output(args.out) as out:
        out.mkdir()
        save_tensors({"train_images": train.images, "train_labels": train.labels,
                      "test_images": test.images, "test_labels": test.labels}, out / "data.safetensors")
        featurizer.save(out / "featurizer")
        ref = featurizer.embed(test.images)
        save_tensors({"features": ref, "mean": ref.mean(0), "cov": torch.cov(ref.T)}, out / "reference.safetensors")
        write_json({"source": p.source, "resolution": p.resolution, "channels": int(full.images.shape[1]),
                    "class_names": full.class_names, "num_train": len(train.labels), "num_test": len(test.labels),
                    "featurizer_test_accuracy": accuracy}, out / "info.json")
    print(f"[prepare] {len(train.labels)} train / {len(test.labels)} held-out images, "
          f"featurizer test accuracy {accuracy:.3f} -> {args.out}", flush=True)


if __name__ == "__main__":
    # every family that trains its teacher from data: the edm default and the text-to-image minis (*-digits)
    runtime.run("prepare", main, lambda ap: ap.add_argument("--out", type=Path, required=True),
                families=EDM + TEXT_TO_IMAGE)
