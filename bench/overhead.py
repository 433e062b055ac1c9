"""Trainer overhead: the distill stage's training loop (fewstep.core.distillation.fit: phases, EMA, dvclive logs,
tqdm, resumable checkpoints at the configured interval) vs a bare loop doing the same math.

    python bench/overhead.py [--steps 100] [--repeats 2] [--threads 0]

Needs the default pipeline's prepare/teacher/trajectories/critic outputs (`dvc repro critic`). Both
loops start from the same freshly loaded models and the same seed; runs alternate bare/fit to share
machine noise. Writes bench/results/overhead.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fewstep.core import distillation
from fewstep.families.edm import edm_trainer
from fewstep.core import objectives, runtime
from fewstep.core.checkpoint import Checkpointer
from fewstep.io import load_tensors, load_trajectories
from fewstep.core.heads import FeatureTap
from fewstep.families.edm.unet import load_model
from fewstep.params import load
from fewstep.core.training import RealBatches, adamw, ema_for
from fewstep.families.edm.unet import karras_grid_sigmas

ROOT = Path(__file__).resolve().parents[1]


def build_setup(params, generator) -> objectives.Setup:
    """The distill stage's Setup, as fewstep.families.edm.edm_trainer.run builds it."""
    device = torch.device("cpu")
    teacher, _ = load_model(ROOT / "teacher/model")
    teacher.requires_grad_(False)
    edm = edm_trainer._edm_of(teacher)
    fake, head = edm_trainer.load_critic(ROOT / "critic/critic", teacher)
    data = load_tensors(ROOT / "prepare/data.safetensors")
    return objectives.Setup(
        teacher=teacher, student=load_model(ROOT / "teacher/model")[0], fake=fake, head=head,
        tap=FeatureTap(fake.unet),
        real=RealBatches(data["train_images"], data["train_labels"], params.batch_size, generator, device),
        conditions=lambda n: torch.randint(teacher.num_classes, (n,), generator=generator),
        noise_levels=lambda n: karras_grid_sigmas(n, edm, params.t_min, params.t_max, generator),
        student_sigmas=edm_trainer.student_sigmas(params, edm), params=params, generator=generator, device=device,
        sigma_data=edm.sigma_data,
        trajectories=distillation.trajectory_batches(load_trajectories(ROOT / "trajectories"), lambda labels: labels,
                                                params.batch_size, generator, device))


def bare_loop(setup: objectives.Setup, params) -> float:
    """The same updates with nothing around them: returns training steps per second."""
    objective = objectives.build(params.objective, setup)
    critic = objective.critic_modules()
    setup.student.requires_grad_(True)
    critic_opt, student_opt = adamw(critic, params), adamw(setup.student, params)
    ema = ema_for(setup.student, params.ema_decay)
    start = time.perf_counter()
    for _ in range(params.steps):
        for module, opt, loss_fn, updates in ((critic, critic_opt, objective.critic_loss, objective.critic_updates),
                                              (setup.student, student_opt, objective.generator_loss, 1)):
            module.train()
            for _ in range(updates):
                opt.zero_grad(set_to_none=True)
                loss_fn()["loss"].backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), params.grad_clip)
                opt.step()
        ema.step(setup.student.parameters())
    return params.steps / (time.perf_counter() - start)


def framework_loop(setup: objectives.Setup, params, scratch: Path) -> float:
    """fewstep.core.distillation.fit with its logging, progress bar and checkpoints (as the stage runs it)."""
    checkpoint = Checkpointer(scratch / "checkpoint", params.checkpoint_every, key="overhead", logs=scratch / "live")
    start = time.perf_counter()
    distillation.fit(setup, params, scratch, "distill", checkpoint=checkpoint)
    return params.steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load(ROOT / "params.yaml")
    d = params.distill.model_copy(update={"steps": args.steps})
    bare, framework = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(build_setup(d, runtime.seeded(params.seed, "distill")), d))
        with tempfile.TemporaryDirectory() as scratch:
            framework.append(framework_loop(build_setup(d, runtime.seeded(params.seed, "distill")), d, Path(scratch)))
        print(f"[overhead] bare {bare[-1]:.3f} steps/s, fit {framework[-1]:.3f} steps/s", flush=True)
    best_bare, best_fit = max(bare), max(framework)
    overhead = (best_bare / best_fit - 1) * 100
    result = {"steps": args.steps, "repeats": args.repeats, "checkpoint_every": d.checkpoint_every,
              "log_every": d.log_every, "bare_steps_per_s": bare, "fit_steps_per_s": framework,
              "overhead_percent": overhead, "torch_threads": torch.get_num_threads()}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=1))
    md = (f"Made by `python bench/overhead.py --steps {args.steps} --repeats {args.repeats} --threads {args.threads}` "
          f"({torch.get_num_threads()} torch threads).\n\n"
          "| loop | training steps/s (best of repeats) |\n|---|---|\n"
          f"| bare (same math, nothing else) | {best_bare:.3f} |\n"
          f"| fewstep.core.distillation.fit (logs every {d.log_every}, checkpoint every {d.checkpoint_every}) | {best_fit:.3f} |\n"
          f"\nOverhead: **{overhead:.1f} %**\n")
    (out / "overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
