"""consistency — consistency distillation (Song et al. 2023; LCM / iCT style) on the teacher's ODE
trajectories from the `trajectories` stage. For adjacent states x_i, x_{i+1} of one teacher Heun
solve, the student's estimate at x_i must match its own stop-gradient estimate at x_{i+1} (the final
image at the end of the path), under iCT's pseudo-Huber distance and 1/(sigma_i − sigma_{i+1})
weighting. EDM's c_skip makes the student the identity at sigma_min (the boundary condition).
No fake score is used: `critic_updates` is 0."""
from __future__ import annotations

import math

import torch

from fewstep.core.objectives.base import Objective


class Consistency(Objective):
    @property
    def critic_updates(self) -> int:
        return 0

    def generator_loss(self) -> dict[str, torch.Tensor]:
        batch = self.trajectory_batch()
        states, sigmas, cond = batch["states"], batch["sigmas"], batch["cond"]
        n, last = len(states), len(sigmas) - 1  # states[:, last] is the image (sigma 0)
        i = torch.randint(last, (n,), generator=self.s.generator).to(states.device)
        rows = torch.arange(n, device=states.device)
        x_i, x_next = states[rows, i], states[rows, i + 1]
        sigma_i, sigma_next = sigmas[i], sigmas[i + 1]
        estimate = self.s.student(x_i, sigma_i, cond)
        with torch.no_grad():
            at_end = (i + 1 == last).view(-1, *[1] * (x_i.dim() - 1))
            inner = self.s.student(x_next, sigma_next.clamp_min(sigmas[last - 1]), cond)
            target = torch.where(at_end, x_next, inner)
        c = self.p.consistency.huber_c or 0.00054 * math.sqrt(x_i[0].numel())
        distance = torch.sqrt(((estimate - target) ** 2).flatten(1).sum(1) + c**2) - c
        loss = (distance / (sigma_i - sigma_next)).mean()
        return {"consistency": loss, "loss": loss}
