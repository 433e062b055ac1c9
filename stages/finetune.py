"""finetune: continue from the distilled student and its critic with finetune's params
(by default DMD2's low-learning-rate phase with the GAN on real data)."""
from pathlib import Path

from fewstep import distill, parallel, runtime


def main(params, args, device):
    with parallel.output(args.out) as out:  # rank 0 writes; other ranks a scratch dir
        distill.run(params.finetune, teacher_dir=args.teacher, prepare_dir=args.prepare, out=out,
                    student_dir=args.distilled / "student", critic_dir=args.distilled / "critic",
                    trajectories_dir=args.trajectories, generator=runtime.seeded(params.seed, "finetune"),
                    device=device, stage="finetune", autocast=runtime.autocast_factory(params, device))
    print(f"[finetune] student -> {args.out / 'student'}", flush=True)


def configure(ap):
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--distilled", type=Path, required=True, help="the distill stage's output directory")
    ap.add_argument("--trajectories", type=Path, required=True, help="the trajectories stage's output")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("finetune", main, configure)
