"""Quality while a student trains: the EMA student scored every `eval_every` steps on a fixed small sample,
logged with dvclive next to the losses (`dvc plots show`, `fewstep plots`).

Each point generates `eval_samples` images from the same noise and labels as the first teacher trajectories
and reports, in the evaluation featurizer's space,
  quality/kid_t     KID against the teacher's images for that very noise and those labels (fidelity to the teacher)
  quality/fid       FID against the held-out real images (biased upwards at this count: read the trend)
and, outside any featurizer, quality/pixel_w1 (pixel-intensity W1 to the held-out images: speckle shows here).
The probe draws nothing from the training streams, so training with curves on or off gives identical weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fewstep.data.sources import load_prepared
from fewstep.core.distances import fid, kid, pixel_view
from fewstep.data.featurizer import Featurizer
from fewstep.core.sampling import batched, student_sample

KID_SUBSETS = 50


class QualityCurve:
    def __init__(self, prepare_dir: Path, traj: dict, sigmas: list[float], num_samples: int,
                 seed: int, device: torch.device, batch_size: int = 500):
        """`traj`: the teacher's trajectories (fewstep.io.load_trajectories), whose first samples are the points'."""
        n = min(num_samples, len(traj["cond_index"]))
        self.noise, self.labels = traj["noise"][:n], traj["cond_index"][:n]
        _, data = load_prepared(prepare_dir, splits=("test",))
        self.real_images = data["test_images"]
        self.featurizer = Featurizer.load(prepare_dir / "featurizer").to("cpu")
        with torch.no_grad():
            self.real = self.featurizer.embed(self.real_images, batch_size)
            self.teacher = self.featurizer.embed(traj["samples"][:n], batch_size)
        self.sigmas, self.seed, self.device, self.batch_size = sigmas, seed, device, batch_size

    @torch.no_grad()
    def __call__(self, student: torch.nn.Module) -> dict[str, float]:
        was_training = student.training
        student.eval()
        generator = torch.Generator(self.device).manual_seed(self.seed)  # the same re-noising at every point
        images = batched(lambda x, y: student_sample(student, x, y, self.sigmas, generator), self.noise,
                         self.labels, self.batch_size, self.device)
        student.train(was_training)
        features = self.featurizer.embed(images, self.batch_size)
        return {"kid_t": kid(self.teacher, features, KID_SUBSETS), "fid": fid(self.real, features),
                "pixel_w1": pixel_view(images, self.real_images)["pixel_w1"]}
