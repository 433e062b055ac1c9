"""distill: train the few-step student (default: 4 steps at timesteps 999/749/499/249, backward
simulation, DMD2 with the GAN head on the critic UNet's mid-block) from the warm-started critic."""
from pathlib import Path

from fewstep import runtime
from fewstep import parallel
from fewstep.sd import distill


def main(params, args, device):
    with parallel.output(args.out) as out:
        distill.run(params, params.distill, stage="distill", encode_dir=args.encode,
                    trajectories_dir=args.trajectories, out=out, device=device, critic_dir=args.critic,
                    generator=runtime.seeded(params.seed, "distill"), pipeline=Path(args.params).resolve().parent.name,
                    autocast=runtime.autocast_factory(params, device))
    print(f"[distill] student -> {args.out / 'student'}", flush=True)


def configure(ap):
    ap.add_argument("--encode", type=Path, required=True)
    ap.add_argument("--trajectories", type=Path, required=True)
    ap.add_argument("--critic", type=Path, required=True, help="the critic stage's critic/ directory")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.sd import launch

    launch.run("distill", main, configure)
