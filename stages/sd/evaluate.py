"""evaluate: the student against the teacher on the held-out prompts, same noise: NFE and per-image
latency always (both in latent space, same batch, same process); fidelity to the teacher always (FID-T,
KID-T, pixel W1 against the teacher's other samples of the same prompts; the teacher's own score is the
floor), in the configured featurizer's space or else the teacher UNet's; CLIP score when evaluate.clip_path is
set and FID when evaluate.fid.featurizer and evaluate.fid.reference are set (otherwise the metrics say
what was skipped and why); decoded sample grids."""
from pathlib import Path

import torch

from fewstep import runtime
from fewstep.distances import fid
from fewstep.grid import save_grid
from fewstep.metrics import latency_ms
from fewstep.io import atomic_output, write_json
from fewstep.sampling import batched, heun_sample, student_sample
from fewstep.sd import encode, evaluate, models, teacher as teachers
from fewstep.sd.store import Encoded, load_trajectories


def image_metrics(p, images: dict, prompts: list[str], resolution: int,
                  features: dict[str, torch.Tensor] | None, net, device) -> tuple[dict, list[str]]:
    """{model: {metric: value}} for the optional metrics, and a notice for each one skipped. `features`: each
    model's images in the configured featurizer `net` (None when unset)."""
    scores, skipped = {name: {} for name in images}, []
    if p.clip_path:
        scorer = evaluate.ClipScorer(p.clip_path, device)  # loaded once for every model's images
        for name, x in images.items():
            scores[name]["clip_score"], scores[name]["clip_score_ci95"] = evaluate.clip_score(
                scorer, x, prompts, p.batch_size)
    else:
        skipped.append("clip_score: skipped (set evaluate.clip_path to a local CLIP model directory)")
    if features is not None and p.fid.reference:
        reference = evaluate.embed(net, evaluate.reference_images(p.fid.reference, resolution), p.batch_size)
        for name, f in features.items():
            scores[name]["fid"] = fid(reference, f)
    else:
        skipped.append("fid: skipped (set evaluate.fid.featurizer to a feature network and evaluate.fid.reference "
                       "to a folder of reference images)")
    return scores, skipped


def main(params, args, device):
    p = params.evaluate
    path = teachers.resolve(params.teacher.path, params.teacher.family)
    held_out = Encoded.load(args.encode, "eval")
    traj = load_trajectories(args.trajectories, "eval")
    cond = held_out.cond[traj["prompt_index"]]
    prompts = [held_out.texts[i] for i in traj["prompt_index"].tolist()]
    teacher = models.teacher_denoiser(path, held_out.negative, device, params.run.precision)
    student, info = models.load(args.student, path, held_out.negative, device, params.run.precision)
    student.requires_grad_(False).eval()
    sigmas = [teacher.sigma_of(t) for t in info["student_timesteps"]]
    steps, guidance = traj["index"]["sampling_steps"], traj["index"]["guidance"]
    gen = runtime.seeded(params.seed, "evaluate")

    # Same noise and prompts as the teacher's held-out trajectories: teacher and student compared pairwise.
    run_student = lambda n, c: student_sample(student, n, c, sigmas, gen)
    run_teacher = lambda n, c: heun_sample(teacher, n, c, steps, guidance)
    timings = {"teacher": [], "student": []}  # ms per image, one per batch
    latents = {"teacher": traj["latents"], "student": batched(run_student, traj["noise"], cond, p.batch_size, device,
                                                                    "student", timings["student"])}
    metrics = {"teacher": {"nfe": traj["index"]["nfe"], "steps": steps, "guidance": guidance},
               "student": {"nfe": len(sigmas), "steps": len(sigmas), "timesteps": info["student_timesteps"]}}

    # Latency as every pipeline measures it: the median per-image time over the batches of evaluate.batch_size a
    # model generated in this process (latent space: text encoding and decoding excluded). The teacher's
    # samples come from the trajectories stage, so it generates one batch here to be timed.
    with torch.no_grad():
        batched(run_teacher, traj["noise"][:p.batch_size], cond[:p.batch_size], p.batch_size, device,
                timings=timings["teacher"])
    for name in ("teacher", "student"):
        metrics[name]["latency_ms"] = latency_ms(timings[name])
    metrics["speedup"] = metrics["teacher"]["latency_ms"] / metrics["student"]["latency_ms"]

    vae = teachers.load_vae(path)
    del vae.encoder  # decoding only: the encoder's work was cached by the encode stage
    images = {name: encode.to_images(vae, x, p.batch_size, device) for name, x in latents.items()}
    resolution = held_out.index["resolution"]
    net = evaluate.load_featurizer(p.fid.featurizer, resolution) if p.fid.featurizer else None
    features = {name: evaluate.embed(net, x, p.batch_size) for name, x in images.items()} if net else None
    scores, skipped = image_metrics(p, images, prompts, resolution, features, net, device)
    rounds = len(cond) // len(held_out.texts)  # trajectories.eval_per_prompt samples of each held-out prompt
    if rounds >= 2:  # fidelity in the featurizer's space, else in the teacher UNet's (needs no other model)
        fidelity_space = features or {name: evaluate.teacher_features(teacher, x, cond, p.batch_size, device, params.seed)
                                      for name, x in latents.items()}
        for name, values in evaluate.fidelity(fidelity_space, images, rounds).items():
            scores[name].update(values)
        metrics["fidelity_features"] = p.fid.featurizer or f"teacher network's middle block, t={evaluate.FEATURE_TIMESTEP}"
    else:
        skipped.append("fid_t: skipped (set trajectories.eval_per_prompt >= 2: the teacher's other samples of a "
                       "prompt are FID-T's reference)")
    for name in images:
        metrics[name].update(scores[name])
        print(f"[evaluate] {name:8s} " + " ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()
                                                   if isinstance(v, (int, float))), flush=True)
    for line in skipped:
        print(f"[evaluate] {line}", flush=True)
    metrics.update(skipped=skipped, num_samples=len(cond), num_prompts=len(held_out.texts))
    print(f"[evaluate] speedup {metrics['speedup']:.1f}x ({metrics['teacher']['nfe']} -> {len(sigmas)} UNet "
          f"evaluations per image)", flush=True)

    grid = min(p.grid_size ** 2, len(cond))
    with atomic_output(args.samples) as out:
        out.mkdir()
        for name, x in images.items():
            save_grid(x[:grid], out / f"{name}.png", nrow=min(p.grid_size, grid))
        write_json({"prompts": prompts[:grid]}, out / "prompts.json")
    with atomic_output(args.metrics) as out:
        write_json(metrics, out)
    print(f"[evaluate] metrics -> {args.metrics}, grids -> {args.samples}", flush=True)


def configure(ap):
    for name in ("encode", "trajectories", "student", "samples", "metrics"):
        ap.add_argument(f"--{name}", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.sd import launch

    launch.run("evaluate", main, configure)
