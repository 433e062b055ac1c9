"""evaluate: teacher and student scored in the same run against the held-out real split — FID,
precision/recall, conditioning accuracy (featurizer), NFE and per-image latency — plus sample grids."""
from pathlib import Path

import torch

from fewstep import runtime
from fewstep.evaluation import batched, seed_noise, student_sampler
from fewstep.grid import save_grid
from fewstep.io import atomic_output, load_trajectories, write_json
from fewstep.data import load_prepared
from fewstep.metrics import Evaluator
from fewstep.models import Featurizer, load_model
from fewstep.sampling import heun_sample, student_sigmas_for


def student_step_counts(num_steps: int) -> list[int]:
    """A k-step student is also scored with each smaller step count that divides k (subsets of its sigmas)."""
    return [k for k in (1, 2, 4, 8) if k <= num_steps and num_steps % k == 0]


def mean_over_seeds(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    fids = torch.tensor([r["fid"] for r in runs], dtype=torch.float64)
    out["fid_std"] = float(fids.std()) if len(runs) > 1 else 0.0
    out["fid_per_seed"] = [r["fid"] for r in runs]
    return out


def main(params, args, device):
    p = params.evaluate
    _, data = load_prepared(args.prepare, splits=("train", "test"))
    evaluator = Evaluator(Featurizer.load(args.prepare / "featurizer"), data["test_images"], k=p.knn_k)
    teacher, _ = load_model(args.teacher, device)
    student, student_info = load_model(args.student, device)
    traj = load_trajectories(args.trajectories)
    labels, steps = traj["labels"], traj["index"]["sampling_steps"]
    num_steps = len(student_info["student_sigmas"])

    samplers = {"teacher": lambda i: (lambda n, y: heun_sample(teacher, n, y, steps)),
                "teacher_1nfe": lambda i: (lambda n, y: heun_sample(teacher, n, y, 1))}
    nfes = {"teacher": traj["index"]["nfe"], "teacher_1nfe": 1}
    for k in student_step_counts(num_steps):
        sigmas = student_sigmas_for(student_info, k)
        samplers[f"student@{k}"] = lambda i, sigmas=sigmas: student_sampler(student, sigmas, params.seed, i)
        nfes[f"student@{k}"] = k

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in samplers}
    timings: dict[str, list[float]] = {name: [] for name in samplers}  # ms per image, one per batch
    first: dict[str, torch.Tensor] = {}
    for i in range(p.seeds):
        noise = seed_noise(traj["noise"], params.seed, i)
        for name, make in samplers.items():
            if i == 0 and name == "teacher":
                images = traj["images"]  # seed 0 is the trajectories' noise: their teacher images
            else:
                images = batched(make(i), noise, labels, p.batch_size, device, f"{name} seed {i}", timings[name])
            runs[name].append(evaluator.score(images, labels))
            first.setdefault(name, images)

    # Latency: the median over the batches generated above (same batch size, process and device for every
    # model), so no model is run again just to be timed. With one seed the teacher generated nothing here.
    if not timings["teacher"]:
        batched(samplers["teacher"](0), traj["noise"][:p.batch_size], labels[:p.batch_size], p.batch_size,
                device, timings=timings["teacher"])
    metrics = {}
    for name in samplers:
        latency = float(torch.tensor(timings[name]).median())
        metrics[name] = {**mean_over_seeds(runs[name]), "nfe": nfes[name], "latency_ms": latency}
        print(f"[evaluate] {name:13s} " + " ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()
                                                    if not isinstance(v, list)), flush=True)
    full = f"student@{num_steps}"
    metrics["data_floor"] = {"fid": evaluator.fid_of(data["train_images"])}
    metrics["speedup"] = metrics["teacher"]["latency_ms"] / metrics[full]["latency_ms"]
    metrics["student_steps"] = num_steps
    metrics["seeds"] = p.seeds
    metrics["num_samples"] = len(labels)
    metrics["num_reference"] = len(data["test_images"])
    print(f"[evaluate] data floor FID {metrics['data_floor']['fid']:.3f}, speedup {metrics['speedup']:.1f}x "
          f"({full} vs teacher), FIDs averaged over {p.seeds} sampling seeds", flush=True)

    n = min(p.grid_size ** 2, len(labels))
    with atomic_output(args.samples) as out:
        out.mkdir()
        for name in ("teacher", *(f"student@{k}" for k in student_step_counts(num_steps))):
            save_grid(first[name][:n], out / f"{name.replace('@', '_')}.png", nrow=p.grid_size)
    with atomic_output(args.metrics) as out:
        write_json(metrics, out)
    print(f"[evaluate] metrics -> {args.metrics}, grids -> {args.samples}", flush=True)


def configure(ap):
    for name in ("prepare", "teacher", "trajectories", "student", "samples", "metrics"):
        ap.add_argument(f"--{name}", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("evaluate", main, configure)
