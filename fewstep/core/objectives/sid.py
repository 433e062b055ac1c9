"""sid — Zhou et al. 2024, "Score identity Distillation": data-free. With x_t = x + sigma*eps,
f_real = teacher(x_t) and f_fake = fake(x_t), the generator minimizes

    (f_real − f_fake) · ((f_real − x) − alpha (f_real − f_fake)) / mean|x − f_real|

with gradients through x *and* through both score networks' inputs (their weights stay frozen).
The fake score is trained like DMD's, `sid.ttur` updates per generator step."""
from __future__ import annotations

import torch

from fewstep.core.training import frozen
from fewstep.core.objectives.base import Objective


class SiD(Objective):
    @property
    def critic_updates(self) -> int:
        return self.p.sid.ttur

    def generator_loss(self) -> dict[str, torch.Tensor]:
        batch = self.generate()
        x, cond = batch.x, batch.cond
        sigma = self.s.noise_levels(len(x))
        noisy = self.noised(x, sigma)
        with frozen(self.s.teacher, self.s.fake):
            f_real = self.s.teacher.guided(noisy, sigma, cond, self.p.real_guidance)
            f_fake = self.fake(noisy, sigma, cond, batch.step)
        dims = tuple(range(1, x.dim()))
        weight = (x - f_real).abs().mean(dim=dims, keepdim=True).detach().clamp_min(1e-5)
        gap = f_real - f_fake
        loss = (gap * ((f_real - x) - self.p.sid.alpha * gap) / weight).sum(dims).mean() / x[0].numel()
        return {"sid": loss, "loss": loss}
