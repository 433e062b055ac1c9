"""The one trainer: every training stage (teacher, critic, distill, finetune) runs through `train`.

A stage describes its work as phases — (optimizer, loss closure, updates per step) — and the trainer
never knows which objective it runs. DMD2's TTUR is simply a critic phase with `updates=5`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fewstep.core import parallel
from fewstep.errors import TrainingDiverged


@dataclass
class Phase:
    name: str                                   # prefix of the logged losses, e.g. "generator"
    module: nn.Module                           # what this phase's optimizer updates
    optimizer: torch.optim.Optimizer
    loss: Callable[[], dict[str, torch.Tensor]] # returns {"loss": total, ...parts to log}
    updates: int = 1                            # optimizer updates per training step (TTUR)
    grad_clip: float | None = None
    warmup_steps: int = 0                       # linear LR warm-up over this many optimizer updates
    accumulate: int = 1                         # loss closures (micro-batches) per optimizer update
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
    params = [list(m.parameters()) for m in modules]
    flags = [[p.requires_grad for p in ps] for ps in params]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        # under FSDP2 `parameters()` yields the shards or, while a root module is gathered, the gathered
        # weights (which take the shards' flag only when gathered): restore both sets, or one keeps False
        for m, ps, fl in zip(modules, params, flags):
            for group in (ps, list(m.parameters())):
                for p, f in zip(group, fl):
                    p.requires_grad_(f)


def _update(phase: Phase, step: int, autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    phase.module.train()
    phase.optimizer.zero_grad(set_to_none=True)
    logged: dict[str, float] = {}
    for _ in range(phase.accumulate):
        with autocast():
            parts = phase.loss()
        loss = parts["loss"].float()
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{phase.name} loss is {loss.item()} at step {step}")
        (loss / phase.accumulate).backward()
        for k, v in parts.items():
            logged[f"{phase.name}/{k}"] = logged.get(f"{phase.name}/{k}", 0.0) + float(v.detach()) / phase.accumulate
    if phase.grad_clip:
        torch.nn.utils.clip_grad_norm_(phase.module.parameters(), phase.grad_clip)
    phase.optimizer.step()
    phase.scheduler.step()
    return parallel.mean_across(logged)


def train(phases: list[Phase], steps: int, live_dir: Path, desc: str,
          after_step: Callable[[int], None] | None = None, log_every: int = 10,
          before_step: Callable[[int], None] | None = None,
          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
          checkpoint=None, curve: Callable[[], dict[str, float]] | None = None,
          curve_every: int = 0) -> dict[str, float]:
    """Run `steps` training steps; each step runs every phase `updates` times in order.

    Losses (averaged over `log_every` steps) go to dvclive under `live_dir` for `dvc plots`.
    With a `fewstep.core.checkpoint.Checkpointer`, every phase's module, optimizer and LR schedule are
    checkpointed with whatever else the caller tracked, and a rerun resumes where the last one stopped.
    A `curve` (the EDM family's QualityCurve of the EMA student) with `curve_every` > 0 is logged as
    `quality/<name>` before the first step and every `curve_every` steps (rank 0 only).
    Returns the last logged averages.
    """
    from dvclive import Live

    window = _LossWindow()
    start = _resume(phases, window, checkpoint)
    live = Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None, resume=start > 0)
    last: dict[str, float] = {}
    curve_due = (lambda step: curve is not None and curve_every > 0 and parallel.world()[0] == 0
                 and (step % curve_every == 0 or step == steps))
    curve_seconds = []

    def log_curve(step: int) -> None:
        started = time.perf_counter()
        _log(live, step, curve(), "quality/")
        curve_seconds.append(time.perf_counter() - started)

    loop_started = time.perf_counter()
    if start == 0 and curve_due(0):
        log_curve(0)
    bar = tqdm(range(start, steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
               initial=start, total=steps)
    for step in bar:
        if before_step is not None:
            before_step(step)
        for phase in phases:
            for _ in range(phase.updates):
                window.add(_update(phase, step, autocast), phase.updates)
        window.count += 1
        if after_step is not None:
            after_step(step)
        if (step + 1) % log_every == 0 or step == steps - 1:
            last = window.flush()
            _log(live, step + 1, last)
            bar.set_postfix({k.split("/")[-1] if len(last) < 3 else k: f"{v:.3g}" for k, v in last.items()})
        if curve_due(step + 1):
            log_curve(step + 1)
        if checkpoint is not None and checkpoint.due(step, steps):
            checkpoint.save(step)
    live.end()
    if curve_seconds:
        total = time.perf_counter() - loop_started
        print(f"[{desc}] quality curve: {len(curve_seconds)} points in {sum(curve_seconds):.1f} s "
              f"({100 * sum(curve_seconds) / total:.1f}% of {total:.0f} s of training)", flush=True)
    if checkpoint is not None:
        checkpoint.finish()
    return last


def _resume(phases: list[Phase], window: "_LossWindow", checkpoint) -> int:
    """Track every phase's module, optimizer and LR schedule (and the loss window) in the checkpoint and restore
    its last save: the step to start from (0 without a checkpoint or a save of this run)."""
    if checkpoint is None:
        return 0
    for phase in phases:
        checkpoint.track(**{f"{phase.name}.module": phase.module, f"{phase.name}.optimizer": phase.optimizer,
                            f"{phase.name}.scheduler": phase.scheduler})
    checkpoint.track(loss_window=window)
    return checkpoint.restore()


def _log(live, step: int, values: dict[str, float], prefix: str = "") -> None:
    live.step = step
    for key, value in values.items():
        live.log_metric(f"{prefix}{key}", value)
    live.make_summary()


class _LossWindow:
    """Loss sums since the last log line (checkpointed, so a resumed run logs the same averages)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float], updates: int) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value / updates

    def flush(self) -> dict[str, float]:
        means = {k: v / self.count for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count = dict(state["sums"]), state["count"]


class Minibatches:
    """Random minibatches of aligned tensors (or anything indexable with `.to`, like a family's conditions) from a
    seeded generator (deterministic order, resumable: the order lives in the generator's state). They are held
    on `device`, or with `keep_on_cpu` (a large latent set) on the CPU, each batch moved when drawn."""

    def __init__(self, tensors: dict, batch_size: int, generator: torch.Generator, device: torch.device,
                 keep_on_cpu: bool = False):
        self.home = torch.device("cpu") if keep_on_cpu else device
        self.tensors = {k: v.to(self.home) for k, v in tensors.items()}
        self.size = len(next(iter(tensors.values())))
        self.batch_size, self.generator, self.device = batch_size, generator, device

    def __call__(self) -> dict:
        idx = torch.randint(self.size, (self.batch_size,), generator=self.generator).to(self.home)
        return {k: v[idx].to(self.device) for k, v in self.tensors.items()}


class RealBatches(Minibatches):
    """Real (image, condition) minibatches: every family's and every teacher trainer's real data."""

    def __init__(self, images: torch.Tensor, labels, batch_size: int, generator: torch.Generator,
                 device: torch.device, keep_on_cpu: bool = False):
        super().__init__({"images": images, "labels": labels}, batch_size, generator, device, keep_on_cpu)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = super().__call__()
        return batch["images"], batch["labels"]


def edm_weighted_mse(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's denoising loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,
    which makes every noise level contribute alike."""
    s = sigma.view(-1, 1, 1, 1)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    return (weight * (pred - target) ** 2).mean()


def lognormal_sigmas(n: int, p_mean: float, p_std: float, generator=None, device="cpu") -> torch.Tensor:
    return torch.exp(p_mean + p_std * torch.randn(n, generator=generator, device=device))


class NoiseRange:
    """The noise levels of the DM / fake-score losses: drawn by `draw(n, t_min, t_max)` from a range of
    positions on the teacher's noise schedule (0 = noisiest; the family's `draw` maps them to sigmas), fixed or,
    with `end`, moved linearly from [t_min, t_max] at the first training step to `end` at the last (the trainer calls `at(step)` before each step, resumed runs included)."""

    def __init__(self, draw: Callable[[int, float, float], torch.Tensor], t_min: float, t_max: float,
                 end: tuple[float, float] | None = None, steps: int = 1):
        self.draw, self.start, self.end, self.steps = draw, (t_min, t_max), end, steps
        self.step = 0

    def at(self, step: int) -> None:
        self.step = step

    def bounds(self) -> tuple[float, float]:
        if self.end is None:
            return self.start
        f = self.step / max(1, self.steps - 1)
        return tuple(a + f * (b - a) for a, b in zip(self.start, self.end))

    def __call__(self, n: int) -> torch.Tensor:
        return self.draw(n, *self.bounds())


def ema_for(module: nn.Module, decay: float, warmup: bool = True):
    """diffusers' EMA. Its warm-up caps the decay at (1+n)/(10+n) after n updates (0.9 after 80, 0.97 after
    290), so a short run averages far fewer steps than `decay` suggests; warmup=False holds `decay` from the
    second update on (the first copies the weights)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(module.parameters(), decay=decay, min_decay=0.0 if warmup else decay)
