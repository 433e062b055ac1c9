"""critic / distill / finetune for SD teachers: build SD denoisers from the teacher directory and the
encode cache, hand them to the model-agnostic fewstep.distill.fit (any objective of the registry), and
save the student and critic. Only UNets are loaded here — never a text encoder, never the VAE."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
import xxhash

from .. import objectives
from ..hashing import Hasher
from ..checkpoint import CHECKPOINTS, Checkpointer, GeneratorState, fingerprint
from ..distill import check_head_fits, fit, trajectory_batches
from ..io import ArtifactError, load_trajectories
from ..models import GanHead
from ..params import ParamsError
from ..training import NoiseRange
from .. import fsdp, parallel, runtime
from . import family as families, models, teacher as teachers
from . import launch as start_up
from .denoiser import SDDenoiser
from .store import CondSampler, Encoded, RealSampler


def noise_levels(model: SDDenoiser, t_min: float, t_max: float, generator: torch.Generator, device,
                 end: tuple[float, float] | None = None, steps: int = 1) -> NoiseRange:
    """DMD2's noise levels for SD: integer timesteps t ~ U{t_min..t_max} (whole numbers, checked by the
    params; a scheduled range is rounded to them), as VE sigmas."""
    sigmas = model.log_sigmas.exp().float()

    def draw(n: int, low: float, high: float) -> torch.Tensor:
        return sigmas[torch.randint(round(low), round(high) + 1, (n,), generator=generator)].to(device)

    return NoiseRange(draw, t_min, t_max, end, steps)


def real_data(train: Encoded, trajectories: dict, batch_size: int, generator, device) -> RealSampler:
    """The GAN's real latents: cached real images when the prompt source has them, else the teacher's
    own ODE samples (the best stand-in for the data distribution a text-only source allows)."""
    if train.latents is not None:
        return RealSampler(train.latents, train.cond, batch_size, generator, device)
    return RealSampler(trajectories["samples"], train.cond[trajectories["cond_index"]], batch_size, generator, device)


def load_student(path: Path, student_dir: Path | None, init_dir: Path | None, settings, negative, latent_size: int,
                 device, run_p, lora: bool, stage: str) -> SDDenoiser:
    """The student: the teacher's network, a previous stage's student (finetune continues it), or a saved
    student to start from (distill.init_student: any step count), optionally under LoRA adapters."""
    # a LoRA student's base is frozen: stored like the teacher (bf16 on GPU); a full student trains in fp32
    dtype = models.frozen_dtype(device, run_p.precision) if lora else torch.float32
    ckpt = run_p.gradient_checkpointing
    start = student_dir or init_dir
    if start is None:
        student = models.denoiser(models.teacher_network(path, dtype), path, negative, device, run_p.precision, ckpt)
    elif student_dir is None:  # init_student: a student of this teacher, whatever its timesteps
        try:
            student, info = models.load(start, path, negative, device, run_p.precision, ckpt, dtype)
        except (ArtifactError, OSError, ValueError) as exc:
            raise ParamsError(f"distill.init_student: {exc}") from None
        if info.get("role") != "student":
            raise ParamsError(f"distill.init_student: {start} is a {info.get('role')}, expected a student distilled "
                              "from this teacher")
    else:
        student, info = models.load(student_dir, path, negative, device, run_p.precision, ckpt, dtype)
        if info["student_timesteps"] != list(settings.student_timesteps):
            raise ParamsError(f"{stage}.student_timesteps must match the student being continued "
                              f"({info['student_timesteps']}), got {list(settings.student_timesteps)}")
    # the student samples at the cached latent size (which may differ from the UNet's native one)
    student.unet.register_to_config(sample_size=latent_size)
    if lora:
        student = models.with_lora(student, settings.lora.rank, settings.lora.alpha, settings.lora.target_modules)
    return student


def load_critic(path: Path, critic_dir: Path | None, negative, device, run_p, features: str,
                stage: str) -> tuple[SDDenoiser, GanHead]:
    """The fake score and GAN head: from a previous stage, or the teacher's network and a fresh head."""
    ckpt = run_p.gradient_checkpointing
    family = families.of_teacher(path)
    if family.flow and features != "bottleneck":
        key = "critic.gan" if stage == "critic" else f"{stage}.dmd2.gan"
        raise ParamsError(f"{key}.features: {features!r} needs a UNet; {family.name}'s transformer gives the GAN head "
                          "its middle block's image tokens (use 'bottleneck')")
    if critic_dir is None:
        fake = models.denoiser(models.teacher_network(path), path, negative, device, run_p.precision, ckpt)
        return fake, GanHead(family.gan_channels(fake.unet, features)).to(device)
    fake, _ = models.load(critic_dir, path, negative, device, run_p.precision, ckpt)
    head = GanHead.load(critic_dir)
    check_head_fits(head, family.gan_channels(fake.unet, features), features, stage, critic_dir)
    return fake, head.to(device)


def _digest(model: SDDenoiser) -> str:
    """xxh3 of the network's weight bytes: equal on every rank when gradients were averaged."""
    return xxhash.xxh3_64_hexdigest(b"".join(w.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                                             for w in model.unet.state_dict().values()))


# --- the text-to-image families' trainer for the shared stage scripts (fewstep.families) --------------

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
    rank, ranks = parallel.world()
    global_settings, seed = settings, generator.initial_seed()
    try:  # batch_size is the global batch, as for every family
        settings = parallel.per_rank(settings, stage, generator)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    path = teachers.resolve(t.path, t.family)
    train = Encoded.load(encode_dir, "train")
    traj = load_trajectories(trajectories_dir, "train", states=settings.objective == "consistency")

    # --- the four networks (FSDP: trained ones built on the CPU, then sharded onto the device) -----------
    build_on = torch.device("cpu") if sharded else device
    teacher = models.teacher_denoiser(path, train.negative, build_on if run_p.shard_teacher else device, run_p.precision)
    lora = train_generator and bool(settings.lora.rank)  # the critic stage trains no student
    latent_size = train.index["latent_shape"][1]
    init_dir = Path(settings.init_student) if student_dir is None and settings.init_student else None
    student = load_student(path, student_dir, init_dir, settings, train.negative, latent_size, build_on, run_p, lora,
                           stage)
    gan = settings.dmd2.gan
    fake, head = load_critic(path, critic_dir, train.negative, build_on, run_p, gan.features, stage)
    tap = families.get(t.family).gan_tap(fake.unet, gan.features)
    if sharded:
        fsdp.broadcast(head.to(device))  # a fresh head is random per rank; the UNets are the same files
        compute = models.AUTOCAST[run_p.precision]
        for module in ([student] if train_generator else []) + [fake, head] + ([teacher] if run_p.shard_teacher else []):
            fsdp.shard(module, device, compute)
        if not train_generator:
            student.to(device)
    else:
        parallel.synchronize(*([student] if train_generator else []), fake, head)

    # --- the objective's view of them ------------------------------------------------------------------
    sigmas = [teacher.sigma_of(s) for s in settings.student_timesteps]
    setup = objectives.Setup(
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
    print(f"[{stage}] {t.family} student timesteps {list(settings.student_timesteps)} "
          f"(sigmas {[round(s, 4) for s in sigmas]}), lora rank {settings.lora.rank if lora else 'off (full network)'}, "
          f"real data: {'cached images' if train.latents is not None else 'teacher samples'}, "
          f"parallel: {run_p.parallel} on {ranks} process(es)", flush=True)

    # --- train (resumable), then save on rank 0 --------------------------------------------------------
    inputs = [d for d in (path, encode_dir, trajectories_dir, student_dir, init_dir, critic_dir) if d is not None]
    key = fingerprint(stage, global_settings.model_dump(mode="json"), train_generator, [Hasher().tree(d) for d in inputs])
    # one checkpoint folder per pipeline and stage (and rank, unless sharded: FSDP checkpoints reshard)
    folder = CHECKPOINTS / parallel.checkpoint_name(pipeline, stage, per_rank=not sharded)
    checkpoint = (fsdp.ShardedCheckpointer(folder, settings.checkpoint_every, key, logs=out / "live") if sharded
                  else Checkpointer(folder, settings.checkpoint_every, key, logs=out / "live"))
    if setup.step_generator is not None:
        checkpoint.track(step_rng=GeneratorState(setup.step_generator))
    last = fit(setup, settings, out, stage, train_generator, autocast, checkpoint)
    if sharded:  # rank 0 saves plain models (built as at the start) holding the gathered weights
        cpu = torch.device("cpu")

        def rebuild() -> list:
            fresh = list(load_critic(path, critic_dir, train.negative, cpu, run_p, gan.features, stage))
            if train_generator:
                fresh.insert(0, load_student(path, student_dir, init_dir, settings, train.negative, latent_size, cpu,
                                             run_p, lora, stage))
            return fresh

        trained = fsdp.unsharded(([student] if train_generator else []) + [fake, head], rebuild)
        if train_generator:
            student = trained.pop(0)
        fake, head = trained
    elif ranks > 1:
        print(f"[{stage}] rank {rank}/{ranks}: trained weights digest "
              f"{_digest(student if train_generator else fake)}", flush=True)
    parallel.finish()
    if rank == 0:
        if train_generator:
            models.save(student.eval(), out / "student", role="student", objective=settings.objective,
                        student_timesteps=list(settings.student_timesteps), teacher=str(t.path))
        models.save(fake.eval(), out / "critic", role="critic")
        head.save(out / "critic")
    return last
