"""distill: train the few-step student with distill.objective (default dmd2) from the warm-started critic.
Every family (`--trainer`)."""
from pathlib import Path

from fewstep.core import stage


def main(params, args, device, trainer):
    stage.train(trainer, "distill", params, params.distill, args, device, critic_dir=args.critic)
    print(f"[distill] student -> {args.out / 'student'}", flush=True)


def configure(ap):
    ap.add_argument("--critic", type=Path, required=True, help="the critic stage's critic/ directory")
    ap.add_argument("--trajectories", type=Path, required=True, help="the trajectories stage's output")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    stage.run_stage("distill", main, configure)
