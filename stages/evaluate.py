"""evaluate: teacher and student scored in the same run against the held-out real split — FID,
precision/recall, conditioning accuracy (featurizer), NFE and per-image latency — plus sample grids."""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep import runtime
from fewstep.grid import save_grid
from fewstep.io import atomic_output, load_tensors, read_json, write_json
from fewstep.metrics import Evaluator, latency_ms
from fewstep.models import Featurizer, load_model
from fewstep.sampling import heun_sample, student_sample


def load_trajectories(folder: Path) -> dict[str, torch.Tensor]:
    index = read_json(folder / "index.json")
    shards = [load_tensors(folder / s["file"], required=("noise", "labels", "images")) for s in index["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in ("noise", "labels", "images")} | {"index": index}


@torch.no_grad()
def batched(fn, noise, labels, batch_size, device, desc):
    pairs = list(zip(noise.split(batch_size), labels.split(batch_size)))
    return torch.cat([fn(n.to(device), y.to(device)).cpu() for n, y in tqdm(pairs, desc=desc, unit="batch")])


def main(params, args, device):
    p = params.evaluate
    data = load_tensors(args.prepare / "data.safetensors", required=("train_images", "test_images"))
    evaluator = Evaluator(Featurizer.load(args.prepare / "featurizer"), data["test_images"], k=p.knn_k)
    teacher, _ = load_model(args.teacher, device)
    student, student_info = load_model(args.student, device)
    traj = load_trajectories(args.trajectories)
    noise, labels, steps = traj["noise"], traj["labels"], traj["index"]["sampling_steps"]
    sigmas = student_info["student_sigmas"]
    gen = runtime.seeded(params.seed, "evaluate")

    # Same noise and labels as the teacher's trajectories: teacher and student are compared pairwise.
    run_student = lambda n, y: student_sample(student, n, y, sigmas, gen)
    run_teacher = lambda n, y: heun_sample(teacher, n, y, steps)
    run_teacher_1 = lambda n, y: heun_sample(teacher, n, y, 1)
    samples = {
        "teacher": traj["images"],
        "teacher_1nfe": batched(run_teacher_1, noise, labels, p.batch_size, device, "teacher 1 NFE"),
        "student": batched(run_student, noise, labels, p.batch_size, device, "student"),
    }
    nfes = {"teacher": traj["index"]["nfe"], "teacher_1nfe": 1, "student": len(sigmas)}

    # Latency: same batch size, same process, same device for every model.
    bench_noise, bench_labels = noise[:p.latency_batch].to(device), labels[:p.latency_batch].to(device)
    timers = {"teacher": run_teacher, "teacher_1nfe": run_teacher_1, "student": run_student}
    metrics = {}
    for name, images in samples.items():
        with torch.no_grad():
            latency = latency_ms(lambda: timers[name](bench_noise, bench_labels), len(bench_noise), p.latency_repeats)
        metrics[name] = {**evaluator.score(images, labels), "nfe": nfes[name], "latency_ms": latency}
        print(f"[evaluate] {name:13s} " + " ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()), flush=True)
    metrics["data_floor"] = {"fid": evaluator.fid_of(data["train_images"])}
    metrics["speedup"] = metrics["teacher"]["latency_ms"] / metrics["student"]["latency_ms"]
    metrics["num_samples"] = len(labels)
    metrics["num_reference"] = len(data["test_images"])
    print(f"[evaluate] data floor FID {metrics['data_floor']['fid']:.3f}, speedup {metrics['speedup']:.1f}x", flush=True)

    n = min(p.grid_size ** 2, len(labels))
    with atomic_output(args.samples) as out:
        out.mkdir()
        for name in ("teacher", "student"):
            save_grid(samples[name][:n], out / f"{name}.png", nrow=p.grid_size)
    with atomic_output(args.metrics) as out:
        write_json(metrics, out)
    print(f"[evaluate] metrics -> {args.metrics}, grids -> {args.samples}", flush=True)


def configure(ap):
    for name in ("prepare", "teacher", "trajectories", "student", "samples", "metrics"):
        ap.add_argument(f"--{name}", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("evaluate", main, configure)
