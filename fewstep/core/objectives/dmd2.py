"""dmd2 — Yin et al. 2024, "Improved Distribution Matching Distillation": the distribution-matching
gradient, a fake score updated `ttur` times per generator step, and a GAN head on the fake score's
bottleneck that compares student samples with real data (what lets the student beat its teacher)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.core.training import frozen
from fewstep.core.objectives.base import Objective


class DMD2(Objective):
    @property
    def critic_updates(self) -> int:
        return self.p.dmd2.ttur

    @property
    def gan(self):
        return self.p.dmd2.gan

    def generator_loss(self) -> dict[str, torch.Tensor]:
        """DM loss plus the non-saturating GAN loss softplus(−D(x)). The head reads the DM pass's fake-score
        features (DMD2: one forward serves both), or with its own noise range a fake-score pass of its own."""
        batch = self.generate()
        use_gan = self.gan.generator_weight > 0
        shared = use_gan and self.s.gan_noise_levels is None
        dm = self.distribution_matching(batch, keep_graph_in_fake=shared)
        if not use_gan:
            return {"dm": dm, "loss": dm}
        if not shared:
            sigma = self.s.gan_noise_levels(len(batch.x))
            with frozen(self.s.fake):  # gradients reach the student through the fake score, never its weights
                self.fake(self.noised(batch.x, sigma), sigma, batch.cond, batch.step)
        with frozen(self.s.head):
            gan = F.softplus(-self.s.head(self.s.tap.features)).mean()
        return {"dm": dm, "gan": gan, "loss": dm + self.gan.generator_weight * gan}

    def critic_loss(self) -> dict[str, torch.Tensor]:
        """Fake-score denoising plus the GAN head's softplus(−D(real)) + softplus(D(student)), both noised (at the
        denoising pass's noise levels, or the GAN head's own range)."""
        with torch.no_grad():
            batch = self.generate()
        denoise = self.fake_score_loss(batch)
        if self.gan.critic_weight == 0:
            return {"denoise": denoise, "loss": denoise}
        levels = self.s.gan_noise_levels or self.s.noise_levels
        if self.s.gan_noise_levels is not None:
            sigma = levels(len(batch.x))
            self.fake(self.noised(batch.x, sigma), sigma, batch.cond, batch.step)
        fake_logits = self.s.head(self.s.tap.features)
        real_x, real_cond = self.s.real()
        sigma = levels(len(real_x))
        self.fake(self.noised(real_x, sigma), sigma, real_cond, batch.step)  # the student batch's step condition
        real_logits = self.s.head(self.s.tap.features)
        gan = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return {"denoise": denoise, "gan": gan, "loss": denoise + self.gan.critic_weight * gan}

    def critic_modules(self) -> nn.Module:
        return nn.ModuleList([self.s.fake, self.s.head])
