"""Distillation driver shared by the critic, distill and finetune stages.

critic:   train only the fake score + GAN head on the initial student's samples (warm start)
distill:  alternate TTUR critic updates and generator updates with the chosen objective
finetune: the same loop, continued from the distilled student and critic with its own params
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from . import objectives
from .io import load_tensors
from .params import ParamsError
from .models import BottleneckTap, EDMDenoiser, GanHead, load_model, save_model
from .training import Phase, RealBatches, adamw, ema_for, train


def real_batches(prepare_dir: Path, batch_size: int, generator, device) -> RealBatches:
    data = load_tensors(prepare_dir / "data.safetensors", required=("train_images", "train_labels"))
    return RealBatches(data["train_images"], data["train_labels"], batch_size, generator, device)


def load_critic(critic_dir: Path | None, teacher: EDMDenoiser) -> tuple[EDMDenoiser, GanHead]:
    """The fake score and GAN head: from a previous stage, or freshly initialized from the teacher."""
    if critic_dir is None:
        fake = copy.deepcopy(teacher)
        head = GanHead(fake.unet.config.block_out_channels[-1])
    else:
        fake, _ = load_model(critic_dir)
        head = GanHead.load(critic_dir)
    device = next(teacher.parameters()).device
    return fake.to(device), head.to(device)


def run(params, *, teacher_dir: Path, prepare_dir: Path, out: Path, generator: torch.Generator,
        device: torch.device, stage: str, student_dir: Path | None = None, critic_dir: Path | None = None,
        train_generator: bool = True) -> dict[str, float]:
    """Train (critic and optionally student) per `params` and write student/, critic/ and live/ under `out`."""
    teacher, _ = load_model(teacher_dir, device)
    teacher.requires_grad_(False)
    if student_dir is None:
        student = copy.deepcopy(teacher)
    else:
        student, student_info = load_model(student_dir, device)
        if student_info["student_sigmas"] != list(params.student_sigmas):
            raise ParamsError(f"{stage}.student_sigmas must match the student being continued "
                              f"({student_info['student_sigmas']}), got {list(params.student_sigmas)}")
    fake, head = load_critic(critic_dir, teacher)
    setup = objectives.Setup(
        teacher=teacher, student=student, fake=fake, head=head, tap=BottleneckTap(fake.unet),
        real=real_batches(prepare_dir, params.batch_size, generator, device),
        params=params, edm=_edm_of(teacher), generator=generator, device=device)
    objective = objectives.build(params.objective, setup)

    critic_modules = objective.critic_modules()
    phases = [Phase("critic", critic_modules, adamw(critic_modules, params), objective.critic_loss,
                    updates=params.ttur if train_generator else 1, grad_clip=params.grad_clip,
                    warmup_steps=params.warmup_steps)]
    ema = None
    if train_generator:
        student.requires_grad_(True)
        ema = ema_for(student, params.ema_decay)
        phases.append(Phase("generator", student, adamw(student, params), objective.generator_loss,
                            grad_clip=params.grad_clip, warmup_steps=params.warmup_steps))
    else:
        student.requires_grad_(False)
    print(f"[{stage}] objective={params.objective} steps={params.steps} batch={params.batch_size} "
          f"lr={params.lr} ttur={phases[0].updates} student_sigmas={params.student_sigmas}", flush=True)

    last = train(phases, params.steps, out / "live", desc=stage,
                 after_step=(lambda step: ema.step(student.parameters())) if ema else None,
                 log_every=params.log_every)

    if ema is not None:
        ema.copy_to(student.parameters())
        save_model(student.eval(), out / "student", role="student", student_sigmas=list(params.student_sigmas),
                   objective=params.objective)
    save_model(fake.eval(), out / "critic", role="critic")
    head.save(out / "critic")
    return last


def _edm_of(denoiser: EDMDenoiser):
    """The EDM noise range the teacher was trained with (from its saved scheduler config)."""
    from types import SimpleNamespace

    c = denoiser.scheduler.config
    return SimpleNamespace(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho)
