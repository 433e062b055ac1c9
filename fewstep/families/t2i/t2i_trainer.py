"""critic / distill / finetune for SD teachers: build SD denoisers from the teacher directory and the
encode cache, hand them to the model-agnostic fewstep.core.distillation.fit (any objective of the registry), and
save the student and critic. Only UNets are loaded here — never a text encoder, never the VAE."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import xxhash

from fewstep.core import objectives
from fewstep.pipeline.hashing import Hasher
from fewstep.core.checkpoint import CHECKPOINTS, Checkpointer, GeneratorState, fingerprint
from fewstep.core.distillation import check_head_fits, fit, gan_key, trajectory_batches
from fewstep.io import ArtifactError, load_trajectories
from fewstep.core.heads import GanHead
from fewstep.params import ParamsError
from fewstep.core.training import NoiseRange, RealBatches
from fewstep.core import fsdp, parallel, runtime
from fewstep.families.t2i import variants, networks, teacher as teachers
from fewstep.families.t2i import launch as start_up
from fewstep.families.t2i.sd_denoiser import SDDenoiser
from fewstep.families.t2i.encoded import CondSampler, Encoded


def noise_levels(model: SDDenoiser, t_min: float, t_max: float, generator: torch.Generator, device,
                 end: tuple[float, float] | None = None, steps: int = 1) -> NoiseRange:
    """DMD2's noise levels for SD, as VE sigmas: integer DDPM timesteps drawn uniformly between the range's
    positions on the schedule (0 = the noisiest timestep, 1 = timestep 0), as DMD2's min/max_step_percent:
    positions 0.02..0.98 are timesteps 20..980."""
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"noise range [{t_min:g}, {t_max:g}]: positions on the schedule, 0 <= t_min < t_max <= 1")
    sigmas = model.log_sigmas.exp().float()
    timesteps = len(sigmas)

    def draw(n: int, low: float, high: float) -> torch.Tensor:
        first, last = round((1 - high) * timesteps), min(round((1 - low) * timesteps), timesteps - 1)
        return sigmas[torch.randint(first, last + 1, (n,), generator=generator)].to(device)

    return NoiseRange(draw, t_min, t_max, end, steps)


def real_data(train: Encoded, trajectories: dict, batch_size: int, generator, device) -> RealBatches:
    """The GAN's real latents: cached real images when the prompt source has them, else the teacher's
    own ODE samples (the best stand-in for the data distribution a text-only source allows)."""
    if train.latents is not None:
        latents, cond = train.latents, train.cond
    else:
        latents, cond = trajectories["samples"], train.cond[trajectories["cond_index"]]
    return RealBatches(latents, cond, batch_size, generator, device, keep_on_cpu=True)


def load_student(path: Path, student_dir: Path | None, init_dir: Path | None, settings, negative, latent_size: int,
                 device, run_p, lora: bool, stage: str) -> SDDenoiser:
    """The student: the teacher's network, a previous stage's student (finetune continues it), or a saved
    student to start from (distill.init_student: any step count), optionally under LoRA adapters."""
    # a LoRA student's base is frozen: stored like the teacher (bf16 on GPU); a full student trains in fp32
    dtype = networks.frozen_dtype(device, run_p.precision) if lora else torch.float32
    ckpt = run_p.gradient_checkpointing
    start = student_dir or init_dir
    if start is None:
        student = networks.denoiser(networks.teacher_network(path, dtype), path, negative, device, run_p.precision, ckpt)
    elif student_dir is None:  # init_student: a student of this teacher, whatever its timesteps
        try:
            student, info = networks.load(start, path, negative, device, run_p.precision, ckpt, dtype)
        except (ArtifactError, OSError, ValueError) as exc:
            raise ParamsError(f"distill.init_student: {exc}") from None
        if info.get("role") != "student":
            raise ParamsError(f"distill.init_student: {start} is a {info.get('role')}, expected a student distilled "
                              "from this teacher")
    else:
        student, info = networks.load(student_dir, path, negative, device, run_p.precision, ckpt, dtype)
        if info["student_timesteps"] != list(settings.student_timesteps):
            raise ParamsError(f"{stage}.student_timesteps must match the student being continued "
                              f"({info['student_timesteps']}), got {list(settings.student_timesteps)}")
    # the student samples at the cached latent size (which may differ from the UNet's native one)
    student.unet.register_to_config(sample_size=latent_size)
    if lora:
        student = networks.with_lora(student, settings.lora.rank, settings.lora.alpha, settings.lora.target_modules)
    return student


def load_critic(path: Path, critic_dir: Path | None, negative, device, run_p, features: str,
                stage: str) -> tuple[SDDenoiser, GanHead]:
    """The fake score and GAN head: from a previous stage, or the teacher's network and a fresh head."""
    ckpt = run_p.gradient_checkpointing
    family = variants.of_teacher(path)
    family.check_gan_features(features, gan_key(stage))
    if critic_dir is None:
        fake = networks.denoiser(networks.teacher_network(path), path, negative, device, run_p.precision, ckpt)
        return fake, GanHead(family.gan_channels(fake.unet, features)).to(device)
    fake, _ = networks.load(critic_dir, path, negative, device, run_p.precision, ckpt)
    head = GanHead.load(critic_dir)
    check_head_fits(head, family.gan_channels(fake.unet, features), features, stage, critic_dir)
    return fake, head.to(device)


def _digest(model: SDDenoiser) -> str:
    """xxh3 of the network's weight bytes: equal on every rank when gradients were averaged."""
    return xxhash.xxh3_64_hexdigest(b"".join(w.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                                             for w in model.unet.state_dict().values()))


# --- the text-to-image families' trainer for the shared stage scripts (fewstep.core.stage) --------------

INPUTS = {"encode": "the encode stage's output (cached text conditioning and latents)"}
launch = start_up.run  # start-up: params of a text-to-image family, continued from the repository root


def train_stage(params, settings, args, *, stage: str, out: Path, device: torch.device, generator: torch.Generator,
                autocast, student_dir: Path | None = None, critic_dir: Path | None = None,
                train_generator: bool = True) -> dict[str, float]:
    if args.trajectories is None:
        raise ParamsError(f"{stage}: --trajectories is required for a text-to-image teacher (the GAN's real "
                          "data when the prompts have no images, and the regression objectives' pairs)")
    return run(params, settings, stage=stage, encode_dir=args.encode, trajectories_dir=args.trajectories, out=out,
               device=device, generator=generator, pipeline=runtime.pipeline_name(args.params),
               student_dir=student_dir, critic_dir=critic_dir, train_generator=train_generator, autocast=autocast)


@dataclass
class _Networks:
    """Where the student and the critic come from, so that a sharded run builds them again, plain, to save."""

    path: Path
    negative: object
    settings: object
    run_p: object
    stage: str
    latent_size: int
    lora: bool
    student_dir: Path | None
    init_dir: Path | None
    critic_dir: Path | None

    def student(self, device) -> SDDenoiser:
        return load_student(self.path, self.student_dir, self.init_dir, self.settings, self.negative, self.latent_size,
                            device, self.run_p, self.lora, self.stage)

    def critic(self, device) -> tuple[SDDenoiser, GanHead]:
        return load_critic(self.path, self.critic_dir, self.negative, device, self.run_p,
                           self.settings.dmd2.gan.features, self.stage)


def run(params, settings, *, stage: str, encode_dir: Path, trajectories_dir: Path, out: Path, device: torch.device,
        generator: torch.Generator, pipeline: str, student_dir: Path | None = None, critic_dir: Path | None = None,
        train_generator: bool = True,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Train per `settings` (a DistillParams-shaped section) and write student/ (if trained), critic/, live/.
    Under torchrun each rank trains on its own noise and prompts for batch_size / ranks samples with averaged
    gradients (the global batch stays `batch_size`); rank 0 saves."""
    t, run_p = params.teacher, params.run
    sharded = run_p.parallel == "fsdp"
    device = fsdp.init(device) if sharded else parallel.init(device)
    global_settings, seed = settings, generator.initial_seed()
    try:  # batch_size is the global batch, as for every family
        settings = parallel.per_rank(settings, stage, generator)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    path = teachers.resolve(t.path, t.family)
    train = Encoded.load(encode_dir, "train")
    traj = load_trajectories(trajectories_dir, "train", states=settings.objective == "consistency")
    nets = _Networks(path, train.negative, settings, run_p, stage, train.index["latent_shape"][1],
                     train_generator and bool(settings.lora.rank),  # the critic stage trains no student
                     student_dir, Path(settings.init_student) if student_dir is None and settings.init_student else None,
                     critic_dir)
    setup = _setup(nets, train, traj, t.family, device, generator, seed, train_generator)
    inputs = [d for d in (path, encode_dir, trajectories_dir, student_dir, nets.init_dir, critic_dir) if d is not None]
    key = fingerprint(stage, global_settings.model_dump(mode="json"), train_generator, [Hasher().tree(d) for d in inputs])
    # one checkpoint folder per pipeline and stage (and rank, unless sharded: FSDP checkpoints reshard)
    folder = CHECKPOINTS / parallel.checkpoint_name(pipeline, stage, per_rank=not sharded)
    checkpoint = (fsdp.ShardedCheckpointer(folder, settings.checkpoint_every, key, logs=out / "live") if sharded
                  else Checkpointer(folder, settings.checkpoint_every, key, logs=out / "live"))
    if setup.step_generator is not None:
        checkpoint.track(step_rng=GeneratorState(setup.step_generator))
    last = fit(setup, settings, out, stage, train_generator, autocast, checkpoint)
    _save(nets, setup, out, train_generator, str(t.path))
    return last


def _setup(nets: _Networks, train: Encoded, traj: dict, family: str, device, generator, seed: int,
           train_generator: bool) -> objectives.Setup:
    """The four networks (FSDP: the trained ones built on the CPU, then sharded onto the device) in the
    objective's view, with the data they train on (per `nets.settings`, this rank's share of the batch)."""
    run_p, settings, sharded = nets.run_p, nets.settings, nets.run_p.parallel == "fsdp"
    ranks = parallel.world()[1]
    build_on = torch.device("cpu") if sharded else device
    teacher = networks.teacher_denoiser(nets.path, train.negative, build_on if run_p.shard_teacher else device,
                                        run_p.precision)
    student = nets.student(build_on)
    fake, head = nets.critic(build_on)
    gan = settings.dmd2.gan
    tap = variants.get(family).gan_tap(fake.unet, gan.features)
    if sharded:
        parallel.broadcast(head.to(device))  # a fresh head is random per rank; the UNets are the same files
        compute = networks.AUTOCAST[run_p.precision]
        for module in ([student] if train_generator else []) + [fake, head] + ([teacher] if run_p.shard_teacher else []):
            fsdp.shard(module, device, compute)
        if not train_generator:
            student.to(device)
    else:
        parallel.synchronize(*([student] if train_generator else []), fake, head)
    sigmas = [teacher.sigma_of(s) for s in settings.student_timesteps]
    print(f"[{nets.stage}] {family} student timesteps {list(settings.student_timesteps)} "
          f"(sigmas {[round(s, 4) for s in sigmas]}), lora rank {settings.lora.rank if nets.lora else 'off (full network)'}, "
          f"real data: {'cached images' if train.latents is not None else 'teacher samples'}, "
          f"parallel: {run_p.parallel} on {ranks} process(es)", flush=True)
    return objectives.Setup(
        teacher=teacher, student=student, fake=fake, head=head, tap=tap,
        real=real_data(train, traj, settings.batch_size, generator, device),
        conditions=CondSampler(train, generator, device),
        noise_levels=noise_levels(teacher, settings.t_min, settings.t_max, generator, device, settings.t_range_end,
                                  settings.steps),
        gan_noise_levels=None if gan.t_min is None else noise_levels(teacher, gan.t_min, gan.t_max, generator, device),
        student_sigmas=sigmas, params=settings, generator=generator, device=device, sigma_data=1.0,
        trajectories=trajectory_batches(traj, lambda index: train.cond[index.cpu()].to(device), settings.batch_size,
                                        generator, device),
        step_generator=torch.Generator().manual_seed(seed) if sharded or ranks > 1 else None,
        all_steps_per_batch=settings.steps_per_batch == "all")


def _save(nets: _Networks, setup: objectives.Setup, out: Path, train_generator: bool, teacher_path: str) -> None:
    """Rank 0 writes student/ (if trained) and critic/; a sharded run first gathers the weights into plain
    models built as at the start."""
    student, fake, head = setup.student, setup.fake, setup.head
    rank, ranks = parallel.world()
    if nets.run_p.parallel == "fsdp":
        cpu = torch.device("cpu")

        def rebuild() -> list:
            fresh = list(nets.critic(cpu))
            return [nets.student(cpu), *fresh] if train_generator else fresh

        trained = fsdp.unsharded(([student] if train_generator else []) + [fake, head], rebuild)
        if train_generator:
            student = trained.pop(0)
        fake, head = trained
    elif ranks > 1:
        print(f"[{nets.stage}] rank {rank}/{ranks}: trained weights digest "
              f"{_digest(student if train_generator else fake)}", flush=True)
    parallel.finish()
    if rank == 0:
        settings = nets.settings
        if train_generator:
            networks.save(student.eval(), out / "student", role="student", objective=settings.objective,
                          student_timesteps=list(settings.student_timesteps), teacher=teacher_path)
        networks.save(fake.eval(), out / "critic", role="critic")
        head.save(out / "critic")
