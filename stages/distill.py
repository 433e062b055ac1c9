"""distill: train the few-step student with distill.objective (default dmd2) from the warm-started critic.
Every family (`--trainer`)."""
from pathlib import Path

from fewstep import families, parallel, runtime


def main(params, args, device, trainer):
    with parallel.output(args.out) as out:  # rank 0 writes; other ranks a scratch dir
        trainer.train_stage(params, params.distill, args, stage="distill", out=out, device=device,
                            generator=runtime.seeded(params.seed, "distill"),
                            autocast=runtime.autocast_factory(params, device), critic_dir=args.critic)
    print(f"[distill] student -> {args.out / 'student'}", flush=True)


def configure(ap):
    ap.add_argument("--critic", type=Path, required=True, help="the critic stage's critic/ directory")
    ap.add_argument("--trajectories", type=Path, required=True, help="the trajectories stage's output")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    families.run_stage("distill", main, configure)
