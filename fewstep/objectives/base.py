"""What every objective is given, and the two loss closures it must provide."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models import BottleneckTap, EDMDenoiser, GanHead
from ..sampling import student_sample
from ..training import RealBatches, karras_grid_sigmas


@dataclass
class Setup:
    teacher: EDMDenoiser         # real score, frozen
    student: EDMDenoiser         # the generator being trained
    fake: EDMDenoiser            # fake score (critic), trained online on student samples
    head: GanHead                # GAN discriminator head on the fake score's bottleneck
    tap: BottleneckTap           # hands the fake score's mid-block features to the head
    real: RealBatches            # real (image, label) minibatches for the GAN
    params: object               # the distill/finetune/critic params section
    edm: object                  # teacher.edm params (noise range)
    generator: torch.Generator   # every random draw of the objective comes from here
    device: torch.device


class Objective:
    def __init__(self, setup: Setup):
        self.s = setup

    # --- shared helpers ---------------------------------------------------------------------------
    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.s.generator, device=self.s.device)

    def random_labels(self, n: int) -> torch.Tensor:
        return torch.randint(self.s.teacher.num_classes, (n,), generator=self.s.generator, device=self.s.device)

    def noise_levels(self, n: int) -> torch.Tensor:
        p = self.s.params
        return karras_grid_sigmas(n, self.s.edm, p.t_min, p.t_max, self.s.generator, self.s.device)

    def generate(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Student samples for fresh noise and random labels (with gradients if enabled)."""
        labels = self.random_labels(n)
        shape = (n, self.s.student.unet.config.in_channels, *([self.s.student.unet.config.sample_size] * 2))
        return student_sample(self.s.student, self.randn(shape), labels, self.s.params.student_sigmas,
                              self.s.generator), labels

    def critic_logits(self, images: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor):
        """Noise images to sigma, run the fake score; return (its x0 prediction, GAN logits)."""
        noisy = images + sigma.view(-1, 1, 1, 1) * self.randn(images.shape)
        pred = self.s.fake(noisy, sigma, labels)
        return pred, self.s.head(self.s.tap.features)

    # --- the interface ----------------------------------------------------------------------------
    def generator_loss(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def critic_loss(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def critic_modules(self) -> nn.Module:
        return nn.ModuleList([self.s.fake, self.s.head])
