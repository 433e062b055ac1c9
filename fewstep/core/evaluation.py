"""The evaluate stage's shared conventions, in one place so benchmarks that re-score a model reproduce the
stage's numbers exactly: which noise each sampling seed uses, which stream re-noises a multi-step student
between its steps, and what a family's evaluation module hands stages/evaluate.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fewstep.core import runtime
from fewstep.core.sampling import student_sample


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


@dataclass
class Model:
    """One model the evaluation samples: its network evaluations per sample, and its sampler for each
    sampling seed (index -> fn(noise, cond) -> samples)."""

    nfe: int
    sampler: Callable[[int], Callable]


@dataclass
class Evaluation:
    """What a family's evaluation module (`--family` of stages/evaluate.py) hands the stage. The stage samples
    every model on the trajectories' noise and conditions (seed 0; the teacher's are `teacher_samples`, already
    solved) and on fresh noise for each further seed, times every model on the same batches, decodes, and
    writes what `score` makes of the samples with nfe, latency and speedup added."""

    models: dict[str, Model]          # "teacher" and the students
    student: str                      # the full student: the speedup is the teacher's latency over its
    noise: torch.Tensor               # the trajectories' noise of the evaluated split
    cond: Any                         # its conditions (sliceable, with .to(device))
    teacher_samples: torch.Tensor     # the trajectories' teacher samples for that noise
    seeds: int                        # sampling seeds
    decode: Callable[[torch.Tensor], torch.Tensor]  # samples -> images in [-1, 1]
    score: Callable[[dict, dict], dict]  # ({model: [samples per seed]}, {model: [images per seed]}) -> metrics
    grids: list[str]                  # models whose first seed's images are drawn as grids
    captions: list[str] | None = None  # text-to-image: the grids' prompts (samples/prompts.json)
