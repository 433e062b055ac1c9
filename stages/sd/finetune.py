"""finetune: continue from the distilled student and its critic with finetune's params (DMD2's
low-learning-rate phase with the GAN on real data)."""
from pathlib import Path

from fewstep import runtime
from fewstep import parallel
from fewstep.sd import distill


def main(params, args, device):
    with parallel.output(args.out) as out:
        distill.run(params, params.finetune, stage="finetune", encode_dir=args.encode,
                    trajectories_dir=args.trajectories, out=out, device=device,
                    student_dir=args.distilled / "student", critic_dir=args.distilled / "critic",
                    generator=runtime.seeded(params.seed, "finetune"), pipeline=Path(args.params).resolve().parent.name,
                    autocast=runtime.autocast_factory(params, device))
    print(f"[finetune] student -> {args.out / 'student'}", flush=True)


def configure(ap):
    ap.add_argument("--encode", type=Path, required=True)
    ap.add_argument("--trajectories", type=Path, required=True)
    ap.add_argument("--distilled", type=Path, required=True, help="the distill stage's output directory")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.sd import launch

    launch.run("finetune", main, configure)
