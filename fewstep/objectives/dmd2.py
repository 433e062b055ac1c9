"""DMD2: distribution matching + two-time-scale fake-score updates + a GAN head on real data."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..training import edm_weighted_mse, frozen
from .base import Objective


class DMD2(Objective):
    def generator_loss(self) -> dict[str, torch.Tensor]:
        """Distribution-matching gradient (x̂_fake − x̂_real) / mean|x − x̂_real| applied to the student
        sample x through loss = ½‖x − sg(x − grad)‖², plus the non-saturating GAN loss softplus(−D).

        One fake-score forward serves both terms: its prediction (detached) for the DM gradient, its
        bottleneck features (with gradient into x) for the GAN logits.
        """
        p = self.s.params
        x, labels = self.generate(p.batch_size)
        sigma = self.noise_levels(len(x))
        with frozen(self.s.fake, self.s.head):
            noisy = x + sigma.view(-1, 1, 1, 1) * self.randn(x.shape)
            with torch.no_grad():
                pred_real = self.s.teacher.guided(noisy, sigma, labels, p.real_guidance)
            use_gan = p.gan.generator_weight > 0
            with torch.set_grad_enabled(use_gan):
                pred_fake = self.s.fake(noisy, sigma, labels)
                logits = self.s.head(self.s.tap.features) if use_gan else None
        pred_fake = pred_fake.detach()
        weight = (x.detach() - pred_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        grad = (pred_fake - pred_real) / weight
        dm = 0.5 * F.mse_loss(x, (x - grad).detach())
        out = {"dm": dm}
        total = dm
        if use_gan:
            gan = F.softplus(-logits).mean()
            total = total + p.gan.generator_weight * gan
            out["gan"] = gan
        out["loss"] = total
        return out

    def critic_loss(self) -> dict[str, torch.Tensor]:
        """Fake score: EDM-weighted denoising loss on detached student samples. GAN head: real images
        vs student samples, both noised, softplus(−D(real)) + softplus(D(fake))."""
        p = self.s.params
        with torch.no_grad():
            x, labels = self.generate(p.batch_size)
        sigma = self.noise_levels(len(x))
        pred, fake_logits = self.critic_logits(x, labels, sigma)
        denoise = edm_weighted_mse(pred, x, sigma, self.s.edm.sigma_data)
        out = {"denoise": denoise}
        total = denoise
        if p.gan.critic_weight > 0:
            real_x, real_labels = self.s.real()
            _, real_logits = self.critic_logits(real_x, real_labels, self.noise_levels(len(real_x)))
            gan = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            total = total + p.gan.critic_weight * gan
            out["gan"] = gan
        out["loss"] = total
        return out
