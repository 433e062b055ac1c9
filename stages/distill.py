"""distill: train the few-step student with the chosen objective (distill.objective, default dmd2)."""
from pathlib import Path

from fewstep import distill, parallel, runtime


def main(params, args, device):
    with parallel.output(args.out) as out:  # rank 0 writes; other ranks a scratch dir
        distill.run(params.distill, teacher_dir=args.teacher, prepare_dir=args.prepare, out=out,
                    critic_dir=args.critic, trajectories_dir=args.trajectories,
                    generator=runtime.seeded(params.seed, "distill"), device=device, stage="distill",
                    autocast=runtime.autocast_factory(params, device))
    print(f"[distill] student -> {args.out / 'student'}", flush=True)


def configure(ap):
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--critic", type=Path, required=True, help="the critic stage's critic/ directory")
    ap.add_argument("--trajectories", type=Path, required=True, help="the trajectories stage's output")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("distill", main, configure)
