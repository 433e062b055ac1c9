"""The evaluate stages' sampling conventions, in one place so benchmarks that re-score a model reproduce the
stage's numbers exactly: which noise each sampling seed uses, and which stream re-noises a multi-step
student between its steps."""
from __future__ import annotations

from typing import Callable

import torch

from . import runtime
from .sampling import student_sample


def seed_noise(trajectory_noise: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """Sampling seed `index`: 0 reuses the trajectories' noise (so teacher and student are compared
    pairwise, and the teacher's images need no resampling); later seeds draw fresh noise, the same for
    every model."""
    if index == 0:
        return trajectory_noise
    return torch.randn(trajectory_noise.shape, generator=runtime.seeded(seed, f"evaluate/{index}"))


def student_sampler(student, sigmas: list[float], seed: int, index: int) -> Callable:
    """The student at `sigmas` for sampling seed `index`; its re-noising between steps has its own stream."""
    generator = runtime.seeded(seed, f"evaluate/student/{index}")
    return lambda noise, cond: student_sample(student, noise, cond, sigmas, generator)
