"""The distillation fit every family's trainer runs: the objective's critic and generator phases over the
trainer loop, the student's EMA, backward simulation with the EMA weights, and the teacher's ODE solves as
minibatches. Families load their networks around it (fewstep.families.*.*_trainer) and save the results.

critic:   train only the fake score (+ GAN head) on the initial student's samples (warm start)
distill:  alternate the objective's critic updates and generator updates
finetune: the same loop, continued from the distilled student and critic with its own params
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import torch

from fewstep.core import objectives
from fewstep.core.checkpoint import Checkpointer, GeneratorState
from fewstep.core.heads import GanHead
from fewstep.core.training import Minibatches, Phase, adamw, ema_for, train
from fewstep.params import ParamsError


def fit(setup: objectives.Setup, params, out: Path, stage: str, train_generator: bool = True,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        checkpoint: Checkpointer | None = None,
        curve: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> dict[str, float]:
    """Train the critic (and the student, if `train_generator`) in place with `params.objective`.
    The student's EMA weights are copied into it at the end. `curve` scores a student module (the EMA weights,
    every `params.eval_every` steps). Returns the last logged losses."""
    objective = objectives.build(params.objective, setup)
    phases = []
    critic_updates = objective.critic_updates if train_generator else 1
    if critic_updates:
        critic = objective.critic_modules()
        critic.requires_grad_(True)
        phases.append(Phase("critic", critic, adamw(critic, params), objective.critic_loss, updates=critic_updates,
                            grad_clip=params.grad_clip, warmup_steps=params.warmup_steps, accumulate=params.grad_accum))
    ema = None
    setup.student.requires_grad_(train_generator)
    if train_generator:
        if params.ema_decay > 0:  # at 0 the average is the weights themselves: no shadow copy to hold
            ema = ema_for(setup.student, params.ema_decay, params.ema_warmup)
        phases.append(Phase("generator", setup.student, adamw(setup.student, params), objective.generator_loss,
                            grad_clip=params.grad_clip, warmup_steps=params.warmup_steps, accumulate=params.grad_accum))
    after_step = (lambda step: ema.step(setup.student.parameters())) if ema else None
    if ema is not None and params.backward_simulation and params.simulate_with == "ema" and len(setup.student_sigmas) > 1:
        setup.simulator = EmaSimulator(setup.student, ema)
        after_step = setup.simulator.after_step
    if checkpoint is not None:
        checkpoint.track(generator_rng=GeneratorState(setup.generator), **({"ema": ema} if ema else {}))
    print(f"[{stage}] objective={params.objective} steps={params.steps} batch={params.batch_size}x{params.grad_accum} "
          f"lr={params.lr} critic_updates={critic_updates if train_generator else 'all'} "
          f"student_sigmas={[round(s, 4) for s in setup.student_sigmas]} "
          f"backward_simulation={params.backward_simulation}"
          f"{f' ({params.simulate_with})' if params.backward_simulation and train_generator else ''}"
          f"{' all steps per batch' if setup.all_steps_per_batch and len(setup.student_sigmas) > 1 else ''}", flush=True)
    last = train(phases, params.steps, out / "live", desc=stage, log_every=params.log_every, autocast=autocast,
                 after_step=after_step, checkpoint=checkpoint,
                 before_step=getattr(setup.noise_levels, "at", None),  # a scheduled noise range follows the step
                 curve=(lambda: with_ema_weights(setup.student, ema, curve)) if curve and ema else
                 (lambda: curve(setup.student)) if curve else None,
                 curve_every=params.eval_every if curve else 0)  # SD params have no curve (yet)
    if ema is not None:
        ema.copy_to(setup.student.parameters())
    return last


def with_ema_weights(module: torch.nn.Module, ema, fn: Callable[[torch.nn.Module], dict]) -> dict:
    """fn(module) with the EMA weights swapped in, the trained weights put back bit for bit afterwards."""
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        return fn(module)
    finally:
        ema.restore(module.parameters())


class EmaSimulator:
    """The student's EMA weights as a frozen module, for backward simulation (`simulate_with: ema`): the
    earlier steps then run the weights inference will run, not the noisier raw ones being trained.
    Re-synced lazily after each EMA update (and so after a checkpoint restore, too)."""

    def __init__(self, student: torch.nn.Module, ema):
        self.ema, self.student = ema, student
        self.module = copy.deepcopy(student).requires_grad_(False)
        self.stale = True

    def after_step(self, step: int) -> None:
        self.ema.step(self.student.parameters())
        self.stale = True

    def __call__(self) -> torch.nn.Module:
        if self.stale:
            self.ema.copy_to(self.module.parameters())
            self.stale = False
        return self.module


def gan_key(stage: str) -> str:
    """The params section of a stage's GAN settings: critic.gan, or distill / finetune's dmd2.gan."""
    return "critic.gan" if stage == "critic" else f"{stage}.dmd2.gan"


def check_head_fits(head: GanHead, channels: int, features: str, stage: str, critic_dir: Path) -> None:
    """The continued GAN head was made for the fake score features this stage reads (critic.gan.features)."""
    if head.config["in_channels"] != channels:
        raise ParamsError(f"{gan_key(stage)}.features: {features!r} does not fit the GAN head in {critic_dir} "
                          f"({head.config['in_channels']} input channels); set it as critic.gan.features")


def trajectory_batches(traj: dict | None, conditions: Callable, batch_size: int, generator, device):
    """Minibatches of the teacher's ODE solves (fewstep.io.load_trajectories) in the objectives' format:
    noise, cond (`conditions` of the stored condition indices), images (the ODE's end points), states when
    loaded, and the sigmas of the states. Every family's trainer builds them here."""
    if traj is None:
        return None
    columns = {"noise": traj["noise"], "cond_index": traj["cond_index"], "images": traj["samples"]}
    if "states" in traj:
        columns["states"] = traj["states"]
    batches = Minibatches(columns, batch_size, generator, device)
    sigmas = torch.tensor(traj["index"]["sigmas"], dtype=torch.float32, device=device)

    def batch():
        b = batches()
        return {**b, "cond": conditions(b.pop("cond_index")), "sigmas": sigmas}
    return batch
