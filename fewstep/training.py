"""The one trainer: every training stage (teacher, critic, distill, finetune) runs through `train`.

A stage describes its work as phases — (optimizer, loss closure, updates per step) — and the trainer
never knows which objective it runs. DMD2's TTUR is simply a critic phase with `updates=5`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


@dataclass
class Phase:
    name: str                                   # prefix of the logged losses, e.g. "generator"
    module: nn.Module                           # what this phase's optimizer updates
    optimizer: torch.optim.Optimizer
    loss: Callable[[], dict[str, torch.Tensor]] # returns {"loss": total, ...parts to log}
    updates: int = 1                            # optimizer updates per training step (TTUR)
    grad_clip: float | None = None
    warmup_steps: int = 0
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = field(default=None, init=False)

    def __post_init__(self):
        warmup = self.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)


def adamw(module: nn.Module, opt) -> torch.optim.AdamW:
    """AdamW from an optimizer params section (lr, betas, weight_decay)."""
    return torch.optim.AdamW(module.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Let gradients flow *through* modules without accumulating into their weights."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, fl in zip(modules, flags):
            for p, f in zip(m.parameters(), fl):
                p.requires_grad_(f)


def _update(phase: Phase, step: int) -> dict[str, float]:
    phase.module.train()
    phase.optimizer.zero_grad(set_to_none=True)
    parts = phase.loss()
    loss = parts["loss"]
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{phase.name} loss is {loss.item()} at step {step}")
    loss.backward()
    if phase.grad_clip:
        torch.nn.utils.clip_grad_norm_(phase.module.parameters(), phase.grad_clip)
    phase.optimizer.step()
    phase.scheduler.step()
    return {f"{phase.name}/{k}": float(v.detach()) for k, v in parts.items()}


def train(phases: list[Phase], steps: int, live_dir: Path, desc: str,
          after_step: Callable[[int], None] | None = None, log_every: int = 10) -> dict[str, float]:
    """Run `steps` training steps; each step runs every phase `updates` times in order.

    Losses (averaged over `log_every` steps) go to dvclive under `live_dir` for `dvc plots`.
    Returns the last logged averages.
    """
    from dvclive import Live

    live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
    sums: dict[str, float] = {}
    count, last = 0, {}
    bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        for phase in phases:
            for _ in range(phase.updates):
                for key, value in _update(phase, step).items():
                    sums[key] = sums.get(key, 0.0) + value / phase.updates
        count += 1
        if after_step is not None:
            after_step(step)
        if count == log_every or step == steps - 1:
            last = {k: v / count for k, v in sums.items()}
            for key, value in last.items():
                live.log_metric(key, value)
            live.step = step + 1
            live.next_step()
            bar.set_postfix({k.split("/")[-1] if len(last) < 3 else k: f"{v:.3g}" for k, v in last.items()})
            sums, count = {}, 0
    live.end()
    return last


class RealBatches:
    """Random minibatches of real (image, label) pairs from a seeded generator (deterministic order)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                 device: torch.device):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.generator = batch_size, generator

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.labels), (self.batch_size,), generator=self.generator)
        idx = idx.to(self.images.device)
        return self.images[idx], self.labels[idx]


def edm_weighted_mse(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's denoising loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,
    which makes every noise level contribute alike."""
    s = sigma.view(-1, 1, 1, 1)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    return (weight * (pred - target) ** 2).mean()


def lognormal_sigmas(n: int, p_mean: float, p_std: float, generator=None, device="cpu") -> torch.Tensor:
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator, device=device))


def karras_grid_sigmas(n: int, edm, t_min: float, t_max: float, generator=None, device="cpu") -> torch.Tensor:
    """Noise levels uniform in Karras-schedule position u in [t_min, t_max] (u=0: sigma_max, u=1: sigma_min).
    The EDM counterpart of DMD2's t ~ U[20, 980] out of 1000."""
    u = t_min + (t_max - t_min) * torch.rand(n, generator=generator, device=device)
    inv_rho = 1.0 / edm.rho
    hi, lo = edm.sigma_max**inv_rho, edm.sigma_min**inv_rho
    return (hi + u * (lo - hi)) ** edm.rho


def ema_for(module: nn.Module, decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(module.parameters(), decay=decay)
