"""critic: warm-start the fake score (initialized from the teacher) and the GAN head on the initial
student's samples, so distillation starts with an accurate fake score."""
from pathlib import Path

from fewstep import distill, parallel, runtime


def main(params, args, device):
    c, d = params.critic, params.distill
    # The critic learns the *initial student's* distribution: it samples like the distill stage will,
    # with critic's own optimizer settings and GAN weights.
    loop = {k: getattr(c, k) for k in type(c).model_fields if k != "gan"}
    settings = d.model_copy(update={**loop, "dmd2": d.dmd2.model_copy(update={"gan": c.gan})})
    with parallel.output(args.out) as out:  # rank 0 writes; other ranks a scratch dir
        distill.run(settings, teacher_dir=args.teacher, prepare_dir=args.prepare, out=out,
                    generator=runtime.seeded(params.seed, "critic"), device=device, stage="critic",
                    train_generator=False, autocast=runtime.autocast_factory(params, device))
    print(f"[critic] fake score + GAN head -> {args.out / 'critic'}", flush=True)


def configure(ap):
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("critic", main, configure)
