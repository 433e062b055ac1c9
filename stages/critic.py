"""critic: warm-start the fake score (initialized from the teacher) and the GAN head on the initial
student's samples, so distillation starts with an accurate fake score."""
from pathlib import Path

from fewstep import distill, runtime
from fewstep.io import atomic_output


def main(params, args, device):
    c = params.critic
    # The critic learns the *initial student's* distribution: it samples like the distill stage will.
    settings = params.distill.model_copy(update={
        "steps": c.steps, "batch_size": c.batch_size, "lr": c.lr, "betas": c.betas, "weight_decay": c.weight_decay,
        "grad_clip": c.grad_clip, "warmup_steps": c.warmup_steps, "gan": c.gan})
    with atomic_output(args.out) as out:
        distill.run(settings, teacher_dir=args.teacher, prepare_dir=args.prepare, out=out,
                    generator=runtime.seeded(params.seed, "critic"), device=device, stage="critic",
                    train_generator=False)
    print(f"[critic] fake score + GAN head -> {args.out / 'critic'}", flush=True)


def configure(ap):
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("critic", main, configure)
