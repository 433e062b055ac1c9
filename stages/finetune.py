"""finetune: continue from the distilled student and its critic with finetune's params (by default DMD2's
low-learning-rate phase with the GAN on real data). Every family (`--trainer`)."""
from pathlib import Path

from fewstep.core import stage


def main(params, args, device, trainer):
    stage.train(trainer, "finetune", params, params.finetune, args, device,
                   student_dir=args.distilled / "student", critic_dir=args.distilled / "critic")
    print(f"[finetune] student -> {args.out / 'student'}", flush=True)


def configure(ap):
    ap.add_argument("--distilled", type=Path, required=True, help="the distill stage's output directory")
    ap.add_argument("--trajectories", type=Path, required=True, help="the trajectories stage's output")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    stage.run_stage("finetune", main, configure)
