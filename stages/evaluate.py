"""evaluate: teacher and students sampled in one run on the same noise and conditions (the trajectories' evaluated
split, and fresh noise for each further sampling seed), every family (`--family`: its evaluation module, which
loads the models and scores the samples). This stage generates, times every model on the same batches (the
median per-image time: latency), decodes, adds NFE, latency and the speedup to the family's metrics, and writes
them with sample grids."""
import time
from pathlib import Path

from fewstep.core import stage
from fewstep.core.evaluation import Evaluation, seed_noise
from fewstep.core.grid import write_scores
from fewstep.core.metrics import latency_ms
from fewstep.core.sampling import batched


def generate(run: Evaluation, seed: int, batch_size: int, device) -> tuple[dict, dict]:
    """Every model's samples per sampling seed, and its per-image times (ms, one per batch). A model that
    generated nothing here (the teacher with one seed: its samples come from the trajectories) is timed on one
    batch, so every latency is measured the same way."""
    samples = {name: [] for name in run.models}
    timings = {name: [] for name in run.models}
    for i in range(run.seeds):
        noise = seed_noise(run.noise, seed, i)
        for name, model in run.models.items():
            if i == 0 and name == "teacher":
                samples[name].append(run.teacher_samples)  # seed 0 is the trajectories' noise: their teacher samples
            else:
                samples[name].append(batched(model.sampler(i), noise, run.cond, batch_size, device,
                                             f"{name} seed {i}", timings[name]))
    for name, model in run.models.items():
        if not timings[name]:
            batched(model.sampler(0), run.noise[:batch_size], run.cond[:batch_size], batch_size, device,
                    timings=timings[name])
    return samples, timings


def main(params, args, device, family):
    p = params.evaluate
    run = family.evaluation(params, args, device)
    started = time.perf_counter()
    samples, timings = generate(run, params.seed, p.batch_size, device)
    print(f"[evaluate] samples of {len(run.models)} models x {run.seeds} seeds in {time.perf_counter() - started:.1f} s",
          flush=True)
    images = {name: [run.decode(x) for x in per_seed] for name, per_seed in samples.items()}
    metrics = run.score(samples, images)
    for name, model in run.models.items():
        metrics[name].update(nfe=model.nfe, latency_ms=latency_ms(timings[name]))
        print(f"[evaluate] {name:13s} " + " ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()
                                                    if isinstance(v, (int, float))), flush=True)
    metrics["speedup"] = metrics["teacher"]["latency_ms"] / metrics[run.student]["latency_ms"]
    print(f"[evaluate] speedup {metrics['speedup']:.1f}x ({run.student}: {run.models[run.student].nfe} network "
          f"evaluations per sample vs the teacher's {run.models['teacher'].nfe})", flush=True)

    n = min(p.grid_size ** 2, len(run.noise))
    write_scores(args.samples, args.metrics, {name: images[name][0][:n] for name in run.grids}, p.grid_size, metrics,
                 None if run.captions is None else run.captions[:n], args.headline, run.student)
    print(f"[evaluate] metrics -> {args.metrics}, grids -> {args.samples}"
          + (f", each model's headline -> {args.headline}" if args.headline else ""), flush=True)


def configure(ap):
    for name in ("trajectories", "student", "samples", "metrics"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--headline", type=Path, help="a folder for one small metrics file per model (DVC's views)")


if __name__ == "__main__":
    stage.run_stage("evaluate", main, configure, stage.EVALUATION)
