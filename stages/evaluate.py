"""evaluate: teacher and student scored in the same run against the held-out real split — FID and KID with
95% intervals over sampling seeds, FID-T (against the teacher's own samples), precision/recall, conditioning accuracy
(featurizer), a pixel-intensity view, NFE and per-image latency — plus an honest floor and sample grids."""
import time
from pathlib import Path

import torch

from fewstep import runtime
from fewstep.evaluation import seed_noise, student_sampler
from fewstep.grid import save_grid
from fewstep.io import atomic_output, load_trajectories, write_json
from fewstep.data import load_prepared
from fewstep.distances import fid, kid, pixel_view
from fewstep.metrics import Evaluator, fid_kid, latency_ms, over_seeds
from fewstep.models import Featurizer, load_model
from fewstep.sampling import batched, heun_sample, student_sigmas_for


def student_step_counts(num_steps: int) -> list[int]:
    """A k-step student is also scored with each smaller step count that divides k (subsets of its sigmas)."""
    return [k for k in (1, 2, 4, 8) if k <= num_steps and num_steps % k == 0]


def mean_over_seeds(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    fids = torch.tensor([r["fid"] for r in runs], dtype=torch.float64)
    out["fid_std"] = float(fids.std()) if len(runs) > 1 else 0.0
    out["fid_per_seed"] = [r["fid"] for r in runs]
    return out


def honest_floor(real: torch.Tensor, teacher: torch.Tensor, splits: int, seed: int) -> dict:
    """The floor scored the way models are, on data the featurizer never trained on: one half of the held-out
    images against the other half, next to as many of the teacher's samples against the same half, over
    `splits` random halvings (mean, and the 2.5-97.5 percentiles over the halvings). FID's bias grows as the
    count falls, so only these two numbers compare with each other, not with the rows above."""
    generator = runtime.seeded(seed, "evaluate/floor")
    floor, teacher_fids = [], []
    for _ in range(splits):
        order = torch.randperm(len(real), generator=generator)
        half, reference = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
        floor.append(fid(reference, half))
        teacher_fids.append(fid(reference, teacher[torch.randperm(len(teacher), generator=generator)[: len(half)]]))

    def summary(values):
        v = torch.tensor(values, dtype=torch.float64)
        return {"fid": float(v.mean()), "fid_range95": v.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()}

    return {**summary(floor), "teacher": summary(teacher_fids), "teacher_wins": sum(t < f for t, f in zip(teacher_fids, floor)),
            "splits": splits, "num_images": len(real) // 2, "num_reference": len(real) - len(real) // 2}


def main(params, args, device):
    p = params.evaluate
    _, data = load_prepared(args.prepare, splits=("test",))
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
    features: dict[str, list[torch.Tensor]] = {name: [] for name in samplers}
    timings: dict[str, list[float]] = {name: [] for name in samplers}  # ms per image, one per batch
    first: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for i in range(p.seeds):
        noise = seed_noise(traj["noise"], params.seed, i)
        for name, make in samplers.items():
            if i == 0 and name == "teacher":
                images = traj["images"]  # seed 0 is the trajectories' noise: their teacher images
            else:
                images = batched(make(i), noise, labels, p.batch_size, device, f"{name} seed {i}", timings[name])
            features[name].append(evaluator.features(images))
            runs[name].append(evaluator.score(images, labels, features[name][-1]))
            first.setdefault(name, images)

    # Latency: the median over the batches generated above (same batch size, process and device for every
    # model), so no model is run again just to be timed. With one seed the teacher generated nothing here.
    if not timings["teacher"]:
        batched(samplers["teacher"](0), traj["noise"][:p.batch_size], labels[:p.batch_size], p.batch_size,
                device, timings=timings["teacher"])
    generated = time.perf_counter()
    print(f"[evaluate] samples of {len(samplers)} models x {p.seeds} seeds in {generated - started:.1f} s", flush=True)
    metrics = {}
    real, reference = evaluator.real_features, features["teacher"][0]  # FID-T's reference: the teacher, seed 0
    for name in samplers:
        latency = latency_ms(timings[name])
        own = features[name][1:] if name == "teacher" else features[name]  # the teacher against its other seeds
        metrics[name] = {**mean_over_seeds(runs[name]),
                         **over_seeds({"fid": [r["fid"] for r in runs[name]],  # scored per seed above
                                       "kid": [kid(real, f) for f in features[name]]}),
                         **(over_seeds(fid_kid([(reference, f) for f in own]), "_t") if own else {}),
                         "nfe": nfes[name], "latency_ms": latency}
        print(f"[evaluate] {name:13s} " + " ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()
                                                    if not isinstance(v, list)), flush=True)
    full = f"student@{num_steps}"
    metrics["floor"] = honest_floor(real, features["teacher"][0], p.floor_splits, params.seed)
    print(f"[evaluate] metrics in {time.perf_counter() - generated:.1f} s", flush=True)
    metrics["speedup"] = metrics["teacher"]["latency_ms"] / metrics[full]["latency_ms"]
    metrics["real_pixel_faint"] = pixel_view(data["test_images"], data["test_images"])["pixel_faint"]
    metrics["student_steps"] = num_steps
    metrics["seeds"] = p.seeds
    metrics["num_samples"] = len(labels)
    metrics["num_reference"] = len(data["test_images"])
    floor = metrics["floor"]
    print(f"[evaluate] floor: held-out half vs half FID {floor['fid']:.3f}, the teacher at that count "
          f"{floor['teacher']['fid']:.3f} ({floor['num_images']} vs {floor['num_reference']} images, "
          f"mean of {floor['splits']} halvings; the teacher lower in {floor['teacher_wins']}); speedup "
          f"{metrics['speedup']:.1f}x ({full} vs teacher); FIDs averaged over {p.seeds} sampling seeds", flush=True)

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
