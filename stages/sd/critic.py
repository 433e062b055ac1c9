"""critic: warm-start the fake score (a copy of the teacher UNet) and the GAN head on the initial
student's samples, so distillation starts with an accurate fake score."""
from pathlib import Path

from fewstep import runtime
from fewstep import parallel
from fewstep.sd import distill


def main(params, args, device):
    c, d = params.critic, params.distill
    # The critic learns the *initial student's* distribution: it samples like the distill stage will,
    # with critic's own optimizer settings and GAN weights.
    loop = {k: getattr(c, k) for k in type(c).model_fields if k != "gan"}
    settings = d.model_copy(update={**loop, "dmd2": d.dmd2.model_copy(update={"gan": c.gan})})
    with parallel.output(args.out) as out:
        distill.run(params, settings, stage="critic", encode_dir=args.encode, trajectories_dir=args.trajectories,
                    out=out, device=device, generator=runtime.seeded(params.seed, "critic"),
                    pipeline=Path(args.params).resolve().parent.name, train_generator=False,
                    autocast=runtime.autocast_factory(params, device))
    print(f"[critic] fake score + GAN head -> {args.out / 'critic'}", flush=True)


def configure(ap):
    ap.add_argument("--encode", type=Path, required=True)
    ap.add_argument("--trajectories", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.sd import launch

    launch.run("critic", main, configure)
