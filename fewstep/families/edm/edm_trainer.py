"""The EDM family's trainer for the shared critic, distill and finetune stages (fewstep.core.stage): loads the
UNet teacher, student and fake score, runs fewstep.core.distillation.fit and saves the results."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import torch

from fewstep.core import objectives, parallel, runtime
from fewstep.pipeline.hashing import Hasher
from fewstep.core.checkpoint import CHECKPOINTS, Checkpointer, fingerprint
from fewstep.families.edm.curves import QualityCurve
from fewstep.data.sources import load_prepared
from fewstep.io import ArtifactError, load_trajectories
from fewstep.families.edm.unet import (EDMDenoiser, karras_grid_sigmas, karras_position, load_model, per_step_labels,
                                       save_model, step_labels, step_tables)
from fewstep.core.distillation import check_head_fits, fit, trajectory_batches
from fewstep.core.heads import FeatureTap, GanHead
from fewstep.params import ParamsError
from fewstep.core.training import NoiseRange, RealBatches


def student_sigmas(params, edm) -> list[float]:
    """The student's conditioning noise levels: given, or k evenly spaced Karras positions 0, 1/k, ...
    (evenly spaced like DMD2's timesteps 999/749/499/249, which SD's noise schedule would map lower; the
    choice is compared in docs/ablations.md)."""
    if params.student_sigmas is not None:
        return [float(s) for s in params.student_sigmas]
    k = params.student_steps
    return [float(karras_position(edm, j / k)) for j in range(k)]


# --- the trainer module for the shared stage scripts (fewstep.core.stage) ---------------------------

INPUTS = {"teacher": "the teacher stage's model directory", "prepare": "the prepare stage's output"}
launch = runtime.run  # start-up: params of the edm family, in the project root


def train_stage(params, settings, args, *, stage: str, out: Path, device: torch.device, generator: torch.Generator,
                autocast, student_dir: Path | None = None, critic_dir: Path | None = None,
                train_generator: bool = True) -> dict[str, float]:
    return run(settings, teacher_dir=args.teacher, prepare_dir=args.prepare, out=out, generator=generator,
               device=device, stage=stage, student_dir=student_dir, critic_dir=critic_dir,
               trajectories_dir=args.trajectories, train_generator=train_generator, autocast=autocast,
               pipeline=runtime.pipeline_name(args.params))


def run(params, *, teacher_dir: Path, prepare_dir: Path, out: Path, generator: torch.Generator,
        device: torch.device, stage: str, student_dir: Path | None = None, critic_dir: Path | None = None,
        trajectories_dir: Path | None = None, train_generator: bool = True,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        pipeline: str = "default") -> dict[str, float]:
    """Train per `params` and write student/ (if trained), critic/ and live/ under `out`.
    Under torchrun each rank draws its own noise and labels for batch_size / ranks samples, gradients are
    averaged (the global batch stays `batch_size`)."""
    device = parallel.init(device)
    try:
        params = parallel.per_rank(params, stage, generator)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    teacher, _ = load_model(teacher_dir, device)
    teacher.requires_grad_(False)
    edm = _edm_of(teacher)
    sigmas = student_sigmas(params, edm)
    init_dir = Path(params.init_student) if student_dir is None and params.init_student is not None else None
    student = load_student(teacher, student_dir, init_dir, sigmas, stage, device)
    per_step = params.per_step_critic and len(sigmas) > 1
    gan = params.dmd2.gan
    fake, head = load_critic(critic_dir, teacher, len(sigmas) if per_step else 1, stage, gan.features)
    parallel.synchronize(*([student] if train_generator else []), fake, head)
    num_classes = teacher.num_classes
    _, data = load_prepared(prepare_dir)
    traj = None if trajectories_dir is None else load_trajectories(trajectories_dir,
                                                                   states=params.objective == "consistency")
    karras = lambda n, t_min, t_max: karras_grid_sigmas(n, edm, t_min, t_max, generator).to(device)  # noqa: E731
    setup = objectives.Setup(
        teacher=teacher, student=student, fake=fake, head=head, tap=FeatureTap(fake.unet, gan.features),
        real=RealBatches(data["train_images"], data["train_labels"], params.batch_size, generator, device),
        conditions=lambda n: torch.randint(num_classes, (n,), generator=generator).to(device),
        noise_levels=NoiseRange(karras, params.t_min, params.t_max, params.t_range_end, params.steps),
        gan_noise_levels=None if gan.t_min is None else NoiseRange(karras, gan.t_min, gan.t_max),
        student_sigmas=sigmas, params=params, generator=generator, device=device, sigma_data=edm.sigma_data,
        trajectories=trajectory_batches(traj, lambda labels: labels, params.batch_size, generator, device),
        critic_cond=(lambda labels, k: step_labels(fake, labels, k)) if per_step else None,
        all_steps_per_batch=params.steps_per_batch == "all")

    inputs = [d for d in (teacher_dir, prepare_dir, student_dir, critic_dir, trajectories_dir, init_dir) if d is not None]
    hasher = Hasher()
    key = fingerprint(stage, params.model_dump(mode="json"), train_generator, [hasher.tree(d) for d in inputs])
    checkpoint = Checkpointer(CHECKPOINTS / parallel.checkpoint_name(pipeline, stage), params.checkpoint_every, key,
                              logs=out / "live")
    curve = None
    if train_generator and params.eval_every and traj is not None:
        curve = QualityCurve(prepare_dir, traj, sigmas, params.eval_samples,
                             generator.initial_seed(), device)
    last = fit(setup, params, out, stage, train_generator, autocast, checkpoint, curve)
    if train_generator:
        save_model(student.eval(), out / "student", role="student", student_sigmas=sigmas, objective=params.objective)
    save_model(fake.eval(), out / "critic", role="critic", step_tables=step_tables(fake))
    head.save(out / "critic")
    parallel.finish()
    return last


def load_student(teacher: EDMDenoiser, student_dir: Path | None, init_dir: Path | None, sigmas: list[float],
                 stage: str, device) -> EDMDenoiser:
    """The student: the teacher's copy, a saved student to start from (distill.init_student), or the previous
    stage's (finetune continues it: its noise levels must be this stage's)."""
    if student_dir is None:
        return copy.deepcopy(teacher) if init_dir is None else load_init_student(init_dir, teacher, device)
    student, student_info = load_model(student_dir, device)
    if [round(s, 6) for s in student_info["student_sigmas"]] != [round(s, 6) for s in sigmas]:
        raise ParamsError(f"{stage}.student_steps/student_sigmas must match the student being continued "
                          f"({student_info['student_sigmas']}), got {sigmas}")
    return student


def load_init_student(path: Path, teacher: EDMDenoiser, device) -> EDMDenoiser:
    """A saved student (any step count) to start from instead of the teacher: e.g. a 4-step student that
    begins as a trained 1-step one. Its weights must fit the teacher's network."""
    try:
        student, info = load_model(path, device)
    except ArtifactError as exc:  # its line names the file; say which key pointed there
        raise ParamsError(f"distill.init_student: {exc}") from None
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if info.get("role") != "student" or shapes(student) != shapes(teacher):
        raise ParamsError(f"distill.init_student: {path} is a {info.get('role')}, expected a student distilled from "
                          "this teacher (same network)")
    return student


def load_critic(critic_dir: Path | None, teacher: EDMDenoiser, tables: int = 1,
                stage: str = "distill", features: str = "bottleneck") -> tuple[EDMDenoiser, GanHead]:
    """The fake score and GAN head: from a previous stage, or freshly initialized from the teacher
    (with `tables` > 1: one label table per student step, for a per-step critic; the head sized for the
    fake score's `features`)."""
    if critic_dir is None:
        fake = copy.deepcopy(teacher)
        if tables > 1:
            per_step_labels(fake, tables)
        head = GanHead(FeatureTap.channels(fake.unet, features))
    else:
        fake, _ = load_model(critic_dir)
        if step_tables(fake) != tables:
            raise ParamsError(f"{stage}.per_step_critic must match the critic being continued ({critic_dir}: "
                              f"{step_tables(fake)} step table(s), this run needs {tables})")
        head = GanHead.load(critic_dir)
        check_head_fits(head, FeatureTap.channels(fake.unet, features), features, stage, critic_dir)
    device = next(teacher.parameters()).device
    return fake.to(device), head.to(device)


def _edm_of(denoiser: EDMDenoiser):
    """The EDM noise range the teacher was trained with (from its saved scheduler config)."""
    from types import SimpleNamespace

    c = denoiser.scheduler.config
    return SimpleNamespace(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho)
