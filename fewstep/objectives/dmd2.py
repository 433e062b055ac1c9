"""dmd2 — Yin et al. 2024, "Improved Distribution Matching Distillation": the distribution-matching
gradient, a fake score updated `ttur` times per generator step, and a GAN head on the fake score's
bottleneck that compares student samples with real data (what lets the student beat its teacher)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..training import frozen
from .base import Objective


class DMD2(Objective):
    @property
    def critic_updates(self) -> int:
        return self.p.dmd2.ttur

    @property
    def gan(self):
        return self.p.dmd2.gan

    def generator_loss(self) -> dict[str, torch.Tensor]:
        """DM loss plus the non-saturating GAN loss softplus(−D(x)); one fake-score forward serves both."""
        batch = self.generate()
        use_gan = self.gan.generator_weight > 0
        dm = self.distribution_matching(batch, keep_graph_in_fake=use_gan)
        if not use_gan:
            return {"dm": dm, "loss": dm}
        with frozen(self.s.head):
            gan = F.softplus(-self.s.head(self.s.tap.features)).mean()
        return {"dm": dm, "gan": gan, "loss": dm + self.gan.generator_weight * gan}

    def critic_loss(self) -> dict[str, torch.Tensor]:
        """Fake-score denoising plus the GAN head's softplus(−D(real)) + softplus(D(student)), both noised."""
        with torch.no_grad():
            batch = self.generate()
        denoise = self.fake_score_loss(batch)
        if self.gan.critic_weight == 0:
            return {"denoise": denoise, "loss": denoise}
        fake_logits = self.s.head(self.s.tap.features)
        real_x, real_cond = self.s.real()
        sigma = self.s.noise_levels(len(real_x))
        self.fake(self.noised(real_x, sigma), sigma, real_cond, batch.step)  # the student batch's step condition
        real_logits = self.s.head(self.s.tap.features)
        gan = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return {"denoise": denoise, "gan": gan, "loss": denoise + self.gan.critic_weight * gan}

    def critic_modules(self) -> nn.Module:
        return nn.ModuleList([self.s.fake, self.s.head])
