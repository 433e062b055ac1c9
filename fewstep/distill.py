"""Distillation driver shared by the critic, distill and finetune stages.

critic:   train only the fake score (+ GAN head) on the initial student's samples (warm start)
distill:  alternate the objective's critic updates and generator updates
finetune: the same loop, continued from the distilled student and critic with its own params

`fit` is the model-agnostic core (any denoisers that follow objectives.Setup's contract, e.g. the SD
pipelines'); `run` loads the digits pipeline's EDM models around it and saves the results.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import torch

from . import objectives, parallel, runtime
from .hashing import Hasher
from .checkpoint import CHECKPOINTS, Checkpointer, GeneratorState, fingerprint
from .curves import QualityCurve
from .data import load_prepared
from .io import ArtifactError, load_trajectories
from .models import (EDMDenoiser, FeatureTap, GanHead, load_model, per_step_labels, save_model,
                     step_labels, step_tables)
from .params import ParamsError
from .training import Minibatches, NoiseRange, Phase, RealBatches, adamw, ema_for, karras_grid_sigmas, train

def karras_positions(edm, positions: list[float]) -> list[float]:
    """Noise levels at fractions u of the Karras schedule (u=0: sigma_max, u=1: sigma_min)."""
    hi, lo = edm.sigma_max ** (1 / edm.rho), edm.sigma_min ** (1 / edm.rho)
    return [float((hi + u * (lo - hi)) ** edm.rho) for u in positions]


def student_sigmas(params, edm) -> list[float]:
    """The student's conditioning noise levels: given, or k evenly spaced Karras positions 0, 1/k, ...
    (evenly spaced like DMD2's timesteps 999/749/499/249; mapped through SD's noise schedule those would
    be lower, sigma/sigma_data 14.6, 4.1, 1.6, 0.69, which trained worse here: README, ablations)."""
    if params.student_sigmas is not None:
        return [float(s) for s in params.student_sigmas]
    k = params.student_steps
    return karras_positions(edm, [j / k for j in range(k)])


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


# --- the EDM family's trainer for the shared stage scripts (fewstep.families) ---------------------------

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
    if student_dir is None:
        student = copy.deepcopy(teacher) if init_dir is None else load_init_student(init_dir, teacher, device)
    else:
        student, student_info = load_model(student_dir, device)
        if [round(s, 6) for s in student_info["student_sigmas"]] != [round(s, 6) for s in sigmas]:
            raise ParamsError(f"{stage}.student_steps/student_sigmas must match the student being continued "
                              f"({student_info['student_sigmas']}), got {sigmas}")
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
        save_model(student.eval(), out / "student", role="student", student_sigmas=sigmas,
                   objective=params.objective)
    save_model(fake.eval(), out / "critic", role="critic", step_tables=step_tables(fake))
    head.save(out / "critic")
    parallel.finish()
    return last


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


def check_head_fits(head: GanHead, channels: int, features: str, stage: str, critic_dir: Path) -> None:
    """The continued GAN head was made for the fake score features this stage reads (critic.gan.features)."""
    if head.config["in_channels"] != channels:
        raise ParamsError(f"{stage}.dmd2.gan.features: {features!r} does not fit the GAN head in {critic_dir} "
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


def _edm_of(denoiser: EDMDenoiser):
    """The EDM noise range the teacher was trained with (from its saved scheduler config)."""
    from types import SimpleNamespace

    c = denoiser.scheduler.config
    return SimpleNamespace(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho)
