"""judge: a *-digits pipeline judged the way a user will judge it, through plain diffusers. The teacher's pipeline
at its recommended call (teacher/fewstep.json) and the exported student at its own (export/fewstep.json) —
`DiffusionPipeline.from_pretrained(dir)(prompts, **call)`, nothing of fewstep in the loop — draw `judge.per_class`
images of each `a handwritten digit k` per seed. prepare's featurizer (a classifier on real digits) reads them at
the data's side: prompt accuracy from its logits, FID against the held-out real digits in its features, FID-T of
the student against the teacher; the teacher's FID-T is its own seeds against each other (the floor). Means over
`judge.seeds` with 95% t-intervals; latency is the pipeline call's median wall time per image.

Beside them, on the same prompts and seeds, fewstep's own samplers from the encode stage's cached conditioning:
the teacher by EDM Heun on its noise range at the trajectories' steps and guidance (`teacher_heun`), and the
student by fewstep's few-step sampler (`student_fewstep`). The export must agree with the latter within the
intervals (else the exported scheduler does not replay the student); the former is the teacher baseline every
other stage uses."""
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep.core import runtime
from fewstep.data.sources import load_prepared
from fewstep.core.distances import fid
from fewstep.core.grid import write_scores
from fewstep.io import ArtifactError, read_json
from fewstep.core.metrics import latency_ms, over_seeds
from fewstep.data.featurizer import Featurizer
from fewstep.core.sampling import batched, heun_sample, student_sample
from fewstep.families.t2i import encode, mini, networks, teacher as teachers
from fewstep.families.t2i.encoded import Encoded

CALL_KEYS = ("num_inference_steps", "guidance_scale", "sigmas", "timesteps")


def load_pipeline(path: Path, family: str, device):
    """A diffusers pipeline directory and the call its fewstep.json recommends."""
    from diffusers import DiffusionPipeline

    usage = read_json(path / "fewstep.json")
    call = {k: usage[k] for k in CALL_KEYS if k in usage}
    if "num_inference_steps" not in call:
        raise ArtifactError(f"{path / 'fewstep.json'}: no num_inference_steps (the recommended call)")
    pipe = DiffusionPipeline.from_pretrained(path, **teachers.pipeline_kwargs(path, family)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


@torch.no_grad()
def generate(pipe, call: dict, prompts: list[str], batch_size: int, seed: int, desc: str):
    """Images in [-1, 1] for the prompts (one seeded generator for the whole set), and seconds per image per batch."""
    generator = torch.Generator().manual_seed(seed)
    images, seconds = [], []  # ms per image, per batch
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", mininterval=1.0):
        batch = prompts[start:start + batch_size]
        began = time.perf_counter()
        out = pipe(batch, generator=generator, output_type="pt", **call).images
        seconds.append((time.perf_counter() - began) * 1000 / len(batch))
        images.append(out.float().cpu() * 2 - 1)
    return torch.cat(images), seconds


class FewstepSamplers:
    """The teacher (EDM Heun) and the student (its few steps) as fewstep samples them, decoded by the teacher's VAE,
    for prompts of the cached training captions (each caption's cached conditioning, CFG against the cached
    negative)."""

    def __init__(self, params, args, device):
        path = teachers.resolve(params.teacher.path, params.teacher.family)
        cached = Encoded.load(args.encode, "train")
        self.rows = {text: i for i, text in enumerate(cached.texts)}  # any row of a caption: all hold the same embedding
        self.cond, self.device, self.batch_size = cached.cond, device, params.judge.batch_size
        self.teacher = networks.teacher_denoiser(path, cached.negative, device, params.run.precision)
        self.student, info = networks.load(args.student, path, cached.negative, device, params.run.precision)
        self.student.requires_grad_(False).eval()
        self.sigmas = [self.teacher.sigma_of(t) for t in info["student_timesteps"]]
        self.steps, self.guidance = params.trajectories.sampling_steps, params.trajectories.guidance
        self.shape = tuple(cached.index["latent_shape"])
        self.vae = teachers.load_vae(path)
        self.seed = params.seed

    def generate(self, name: str, prompts: list[str], seed: int):
        missing = sorted({p for p in prompts if p not in self.rows})
        if missing:
            raise ArtifactError(f"the encode stage cached no conditioning for {missing[0]!r} (prompts.source)")
        cond = self.cond[torch.tensor([self.rows[p] for p in prompts])]
        noise = torch.randn((len(prompts), *self.shape), generator=runtime.seeded(self.seed, f"judge/{seed}"))
        renoise = runtime.seeded(self.seed, f"judge/student/{seed}")
        sample = ((lambda x, c: heun_sample(self.teacher, x, c, self.steps, self.guidance)) if name == "teacher_heun"
                  else (lambda x, c: student_sample(self.student, x, c, self.sigmas, renoise)))
        seconds = []  # ms per image, per batch
        latents = batched(sample, noise, cond, self.batch_size, self.device, desc=f"{name} seed {seed}", timings=seconds)
        return encode.to_images(self.vae, latents, self.batch_size, self.device), seconds


def main(params, args, device):
    p, family = params.judge, params.teacher.family
    info, data = load_prepared(args.prepare, splits=("test",))
    featurizer = Featurizer.load(args.prepare / "featurizer")
    reference = featurizer.embed(data["test_images"])
    labels = torch.arange(len(info["class_names"])).repeat_interleave(p.per_class)
    prompts = [mini.caption(int(info["class_names"][k])) for k in labels.tolist()]
    models = {"teacher": args.teacher, "student": args.export, "teacher_heun": None, "student_fewstep": None}
    per_seed = {name: {"prompt_accuracy": [], "fid": []} for name in models}
    features, latency, calls, grids = {}, {}, {}, {}
    fewstep = FewstepSamplers(params, args, device)
    for name, path in models.items():
        if path is not None:
            pipe, calls[name] = load_pipeline(path, family, device)
            draw = lambda seed: generate(pipe, calls[name], prompts, p.batch_size, seed, f"{name} seed {seed}")
        else:
            calls[name] = {"sampler": "fewstep EDM Heun", "steps": fewstep.steps, "guidance": fewstep.guidance} \
                if name == "teacher_heun" else {"sampler": "fewstep student", "steps": len(fewstep.sigmas)}
            draw = lambda seed: fewstep.generate(name, prompts, seed)
        features[name], timings = [], []
        for seed in range(p.seeds):
            images, seconds = draw(seed)
            grey = mini.to_grey(images, info["resolution"])
            with torch.no_grad():
                predicted = featurizer.logits(grey).argmax(1)
            features[name].append(featurizer.embed(grey))
            per_seed[name]["prompt_accuracy"].append(float((predicted == labels).double().mean()))
            per_seed[name]["fid"].append(fid(reference, features[name][-1]))
            timings += seconds
            if seed == 0:  # the grid: the first `grid_size` images of each digit, one digit a row
                pick = torch.cat([torch.arange(k * p.per_class, k * p.per_class + min(p.grid_size, p.per_class))
                                  for k in range(len(info["class_names"]))])
                grids[name] = images[pick]
        latency[name] = latency_ms(timings)
    seeds = range(p.seeds)
    for name in ("student", "teacher_heun", "student_fewstep"):  # against the teacher's recommended call
        per_seed[name]["fid_t"] = [fid(features["teacher"][s], features[name][s]) for s in seeds]
    if p.seeds > 1:  # the floor: the teacher against itself under other noise
        per_seed["teacher"]["fid_t"] = [fid(features["teacher"][(s + 1) % p.seeds], features["teacher"][s]) for s in seeds]
    metrics = {name: {**over_seeds(values), "latency_ms": latency[name], "call": calls[name], "images": len(prompts)}
               for name, values in per_seed.items()}
    metrics["featurizer"] = f"{args.prepare}/featurizer at {info['resolution']}x{info['resolution']}"
    metrics["seeds"] = p.seeds
    metrics["latency"] = "pipeline call, per image (teacher, student: text encoding and decoding included); " \
                         "sampler only, per image (teacher_heun, student_fewstep: latents)"
    write_scores(args.out / "samples", args.out / "metrics.json", grids, min(p.grid_size, p.per_class), metrics)
    for name in models:
        m = metrics[name]
        print(f"[judge] {name}: prompt accuracy {m['prompt_accuracy']:.3f}, FID {m['fid']:.3f}, "
              f"{m['latency_ms']:.2f} ms/image ({calls[name]})", flush=True)


def configure(ap):
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--encode", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.families.t2i import launch

    launch.run("judge", main, configure)
