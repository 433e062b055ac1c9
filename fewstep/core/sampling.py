"""Samplers: the teacher's deterministic EDM Heun ODE solver and the few-step student."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from fewstep.core.denoiser import Denoiser


def karras_sigmas(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """`steps` Karras noise levels from sigma_max down to sigma_min, then a final 0 (diffusers' schedule)."""
    denoiser.scheduler.set_timesteps(steps)
    return denoiser.scheduler.sigmas.to(torch.float32).clone()


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                guidance: float = 1.0, keep_states: bool = False):
    """EDM's deterministic 2nd-order sampler (Algorithm 1). NFE = 2 * steps - 1.

    `noise` is unit Gaussian; returns the image and, with keep_states, the states x_i at every sigma_i
    as (B, steps + 1, C, H, W) plus the sigmas they sit at.
    """
    sigmas = karras_sigmas(denoiser, steps).to(noise.device)
    x = noise * sigmas[0]
    states = [x]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - denoiser.guided(x, sigma, labels, guidance)) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if sigma_next > 0:
            slope_next = (x_next - denoiser.guided(x_next, sigma_next, labels, guidance)) / sigma_next
            x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        x = x_next
        states.append(x)
    if keep_states:
        return x, torch.stack(states, dim=1), sigmas
    return x


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's (CPU) device, then moved: the same numbers on any device."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def student_sample(student, noise: torch.Tensor, cond, sigmas: list[float],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step generation: denoise at each conditioning sigma, re-noise the estimate to the next one.

    `cond` is whatever the denoiser conditions on (class labels here, prompt embeddings for SD).
    Gradients flow when called outside no_grad.
    """
    x = noise * sigmas[0]
    for k, sigma in enumerate(sigmas):
        x0 = student(x, sigma, cond)
        if k + 1 < len(sigmas):
            x = x0 + sigmas[k + 1] * randn(x0.shape, generator, x0.device, x0.dtype)
    return x0


def student_sigmas_for(info: dict, steps: int) -> list[float]:
    """A k-step student evaluated with fewer steps uses an evenly spaced subset of its own noise levels."""
    sigmas = list(info["student_sigmas"])
    if len(sigmas) % steps:
        raise ValueError(f"a {len(sigmas)}-step student cannot sample with {steps} steps (use a divisor)")
    return sigmas[:: len(sigmas) // steps]


def sample_model(denoiser: Denoiser, info: dict, noise: torch.Tensor, labels: torch.Tensor,
                 steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample any saved fewstep model: Heun for a teacher, its own noise levels for a student."""
    if info["role"] == "teacher":
        return heun_sample(denoiser, noise, labels, steps or info.get("sampling_steps", 18))
    sigmas = student_sigmas_for(info, steps or len(info["student_sigmas"]))
    with torch.no_grad():
        return student_sample(denoiser, noise, labels, sigmas, generator)


def teacher_nfe(steps: int, guidance: float) -> int:
    """Network evaluations per teacher sample: Heun's 2 * steps - 1, twice over under CFG."""
    return (2 * steps - 1) * (1 if guidance == 1 else 2)


@dataclass
class TeacherSplit:
    """One set of teacher ODE solves for the trajectories stage, as a family states it: `count` samples
    whose condition indices run through 0 .. num_conditions - 1 in turn, from the noise stream `noise_stream`."""

    name: str
    count: int
    num_conditions: int
    conditions: Callable[[torch.Tensor], Any]  # condition indices -> what the teacher's `guided` takes
    noise_stream: str


def nfe(info: dict, steps: int | None = None, guidance: float = 1.0) -> int:
    """Network evaluations per sample of a saved model sampled as `sample_model` does (a teacher's Heun solve,
    guided or not; a student's one evaluation per step)."""
    if info["role"] == "teacher":
        return teacher_nfe(steps or info.get("sampling_steps", 18), guidance)
    return steps or len(info["student_sigmas"])


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
