"""dmd — Yin et al. 2023, "One-step Diffusion with Distribution Matching Distillation" (DMD1):
the distribution-matching gradient plus a regression of the student's first step onto the teacher's
ODE solutions (noise -> image pairs from the `trajectories` stage), with 1:1 fake-score updates.
DMD1 regresses with LPIPS; here the distance is mean squared error in data space."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fewstep.core.objectives.base import Objective


class DMD(Objective):
    def generator_loss(self) -> dict[str, torch.Tensor]:
        dm = self.distribution_matching(self.generate())
        pairs = self.trajectory_batch()
        sigma = self.s.student_sigmas[0]
        one_step = self.s.student(pairs["noise"] * sigma, sigma, pairs["cond"])
        regression = F.mse_loss(one_step, pairs["images"])
        return {"dm": dm, "regression": regression, "loss": dm + self.p.dmd.regression_weight * regression}
