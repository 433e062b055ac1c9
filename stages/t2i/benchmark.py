"""benchmark: DMD2's text-to-image protocol, when benchmark.source names local caption/image pairs (e.g. COCO-2014
val: 10k at 512 px for SDXL, 30k at 256 px for SD1.5): one image per caption from the student and the teacher
(same noise), FID against the captions' own images in benchmark.featurizer's space (the FID Inception, a local
file), CLIP score with benchmark.clip_path — each with a 95% interval over benchmark.seeds sampling seeds. Off
(one line in metrics.json) while benchmark.source is unset. Captions are encoded here, batch by batch, through
the teacher's text encoders."""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep.core import runtime
from fewstep.core.grid import write_scores
from fewstep.core.sampling import heun_sample, student_sample, teacher_nfe
from fewstep.families.t2i import (benchmark, encode, t2i_evaluation, networks,
                                  teacher as teachers)
from fewstep.families.t2i.sd_denoiser import SDCond
from fewstep.families.t2i.encoded import DTYPES, Encoded

INTERVALS = ("95% t-intervals of the mean over benchmark.seeds sampling seeds (fid, kid, clip_score; with one seed "
             "none for fid and kid, and clip_score's over the images): fewstep.core.metrics")


def captions(pipe, texts: list[str], encoded: Encoded, family: str, dtype: torch.dtype, device) -> SDCond:
    """Conditioning exactly as the encode stage caches it (same encoders, same storage dtype, same time ids)."""
    cond = encode.encode_texts(pipe, texts, family, len(texts), device, progress=False)
    time_ids = encoded.index["time_ids"]
    return SDCond(cond.embeds.to(dtype).float(), None if cond.pooled is None else cond.pooled.to(dtype).float(),
                  torch.tensor(time_ids, dtype=torch.float32).expand(len(texts), -1) if time_ids else None)


def samplers(params, path, negative, args, device) -> tuple[dict, dict]:
    """{model: fn(noise, cond) -> latents} and each model's NFE: the student, and the teacher as the
    trajectories stage samples it (Heun, its steps and CFG) unless benchmark.teacher is off."""
    student, info = networks.load(args.student, path, negative, device, params.run.precision)
    student.requires_grad_(False).eval()
    sigmas = [student.sigma_of(t) for t in info["student_timesteps"]]
    gen = runtime.seeded(params.seed, "benchmark-student")
    fns = {"student": lambda n, c: student_sample(student, n, c, sigmas, gen)}
    nfe = {"student": len(sigmas)}
    if params.benchmark.teacher:
        teacher = networks.teacher_denoiser(path, negative, device, params.run.precision)
        t = params.trajectories
        fns["teacher"] = lambda n, c: heun_sample(teacher, n, c, t.sampling_steps, t.guidance)
        nfe["teacher"] = teacher_nfe(t.sampling_steps, t.guidance)
    return fns, nfe


def main(params, args, device):
    b = params.benchmark
    if not b.source:
        line = ("benchmark: off (set benchmark.source to local caption/image pairs, and benchmark.featurizer and/or "
                "benchmark.clip_path)")
        print(f"[benchmark] {line}", flush=True)
        write_scores(args.samples, args.metrics, {}, b.grid_size, {"skipped": [line]}, captions=[])
        return
    path = teachers.resolve(params.teacher.path, params.teacher.family)
    encoded = Encoded.load(args.encode, "eval")  # the negative prompt, SDXL time ids, latent shape
    pairs = benchmark.load_pairs(b.source, b.text_column, b.image_column, b.count, params.seed)
    n, family = len(pairs.texts), params.teacher.family
    fns, nfe = samplers(params, path, encoded.negative, args, device)
    print(f"[benchmark] {n} caption/image pairs from {b.source}; models: {', '.join(fns)}; FID at {b.resolution}px "
          f"{'in ' + b.featurizer if b.featurizer else 'off'}; CLIP {'with ' + b.clip_path if b.clip_path else 'off'}",
          flush=True)
    pipe = teachers.load_text_pipeline(path, family).to(device)
    vae = teachers.load_vae(path)
    del vae.encoder
    net = t2i_evaluation.load_featurizer(b.featurizer, b.resolution, "benchmark.featurizer").to(device) if b.featurizer else None
    clip = t2i_evaluation.ClipScorer(b.clip_path, device, "benchmark.clip_path") if b.clip_path else None
    dtype, latent_shape = DTYPES[params.encode.dtype], encoded.index["latent_shape"]
    keep = b.grid_size ** 2
    noise_gens = [runtime.seeded(params.seed, "benchmark" if seed == 0 else f"benchmark-{seed}")
                  for seed in range(b.seeds)]
    per_seed = [{name: benchmark.ModelScores() for name in fns} for _ in range(b.seeds)]
    reference = benchmark.ModelScores()
    for start in tqdm(range(0, n, b.batch_size), desc="benchmark", unit="batch", mininterval=5.0):
        texts = pairs.texts[start:start + b.batch_size]
        cond = captions(pipe, texts, encoded, family, dtype, device).to(device)  # once for every seed
        reference.add(pairs.images(start, start + len(texts)), texts, net, clip, b.resolution, keep, device)
        for seed, (noise_gen, kept) in enumerate(zip(noise_gens, per_seed)):
            noise = torch.randn((len(texts), *latent_shape), generator=noise_gen).to(device)
            for name, fn in fns.items():
                with torch.no_grad():
                    images = encode.to_images(vae, fn(noise, cond), b.batch_size, device)
                kept[name].add(images, texts, net, clip, b.resolution, keep if seed == 0 else 0, device)

    metrics = {"protocol": {"source": b.source, "pairs": n, "resolution": b.resolution, "featurizer": b.featurizer,
                            "clip_path": b.clip_path, "seeds": b.seeds, "intervals": INTERVALS}}
    for name in fns:
        metrics[name] = {"nfe": nfe[name], **benchmark.scores_over_seeds([kept[name] for kept in per_seed], reference)}
        print(f"[benchmark] {name:8s} " + " ".join(f"{k}={v:.4g}" for k, v in metrics[name].items()
                                                   if isinstance(v, (int, float))), flush=True)
    if clip:  # the captions' own images: the CLIP score real data reaches
        metrics["reference"] = {"clip_score": t2i_evaluation.per_image_mean(torch.cat(reference.clip))[0]}
    kept = {**per_seed[0], "reference": reference}  # the grids: seed 0's images, and the captions' own
    write_scores(args.samples, args.metrics, {name: torch.cat(scores.grid) for name, scores in kept.items()},
                 b.grid_size, metrics, pairs.texts[:keep])
    print(f"[benchmark] metrics -> {args.metrics}, grids -> {args.samples}", flush=True)


def configure(ap):
    for name in ("encode", "student", "samples", "metrics"):
        ap.add_argument(f"--{name}", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("benchmark", main, configure)
