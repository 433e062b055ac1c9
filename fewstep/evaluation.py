"""The evaluate stages' sampling conventions, in one place so benchmarks that re-score a model reproduce the
stage's numbers exactly: which noise each sampling seed uses, which stream re-noises a multi-step
student between its steps, and batched generation."""
from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import runtime
from .sampling import student_sample


@torch.no_grad()
def batched(fn: Callable, noise: torch.Tensor, cond, batch_size: int, device,
            desc: str | None = None, timings: list[float] | None = None) -> torch.Tensor:
    """fn(noise, cond) over batches on `device`, gathered on the CPU; a progress bar when `desc` is given.
    `cond` is anything sliceable with a `.to(device)`: class labels, or the SD pipelines' SDCond.
    With `timings`, each batch's wall time per image (ms, up to its outputs on the CPU) is appended to it."""
    outputs = []
    for i in tqdm(range(0, len(noise), batch_size), desc=desc, unit="batch", disable=desc is None):
        start = time.perf_counter()
        n = noise[i:i + batch_size]
        outputs.append(fn(n.to(device), cond[i:i + batch_size].to(device)).cpu())
        if timings is not None:
            timings.append((time.perf_counter() - start) / len(n) * 1e3)
    return torch.cat(outputs)


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
