"""critic: warm-start the fake score (initialized from the teacher's network) and the GAN head on the initial
student's samples, so distillation starts with an accurate fake score. Every family (`--trainer`)."""
from pathlib import Path

from fewstep.core import stage
from fewstep.params import TrainLoopParams


def main(params, args, device, trainer):
    c, d = params.critic, params.distill
    # The critic learns the *initial student's* distribution: it samples like the distill stage will,
    # with critic's own optimizer settings and GAN weights.
    loop = {k: getattr(c, k) for k in TrainLoopParams.model_fields}
    settings = d.model_copy(update={**loop, "dmd2": d.dmd2.model_copy(update={"gan": c.gan}),
                                    "t_range_end": None})  # warmed at the range distill starts from
    stage.train(trainer, "critic", params, settings, args, device, train_generator=False)
    print(f"[critic] fake score + GAN head -> {args.out / 'critic'}", flush=True)


def configure(ap):
    ap.add_argument("--trajectories", type=Path, help="the trajectories stage's output (the GAN's stand-in for "
                                                            "real data where a family has none)")
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    stage.run_stage("critic", main, configure)
