"""judge: a *-digits pipeline judged the way a user will judge it, through plain diffusers. The teacher's pipeline
at its recommended call (teacher/fewstep.json) and the exported student at its own (export/fewstep.json) —
`DiffusionPipeline.from_pretrained(dir)(prompts, **call)`, nothing of fewstep in the loop — draw `judge.per_class`
images of each `a handwritten digit k` per seed. prepare's featurizer (a classifier on real digits) reads them at
the data's side: prompt accuracy from its logits, FID against the held-out real digits in its features, FID-T of
the student against the teacher; the teacher's FID-T is its own seeds against each other (the floor). Means over
`judge.seeds` with 95% t-intervals; latency is the pipeline call's median wall time per image."""
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep.data import load_prepared
from fewstep.distances import fid
from fewstep.grid import write_scores
from fewstep.io import ArtifactError, read_json
from fewstep.metrics import latency_ms, over_seeds
from fewstep.models import Featurizer
from fewstep.sd import mini, teacher as teachers

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
    images, seconds = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", mininterval=1.0):
        batch = prompts[start:start + batch_size]
        began = time.perf_counter()
        out = pipe(batch, generator=generator, output_type="pt", **call).images
        seconds.append((time.perf_counter() - began) * 1000 / len(batch))
        images.append(out.float().cpu() * 2 - 1)
    return torch.cat(images), seconds


def main(params, args, device):
    p, family = params.judge, params.teacher.family
    info, data = load_prepared(args.prepare, splits=("test",))
    featurizer = Featurizer.load(args.prepare / "featurizer")
    reference = featurizer.embed(data["test_images"])
    labels = torch.arange(len(info["class_names"])).repeat_interleave(p.per_class)
    prompts = [mini.caption(int(info["class_names"][k])) for k in labels.tolist()]
    models = {"teacher": args.teacher, "student": args.export}
    per_seed = {name: {"prompt_accuracy": [], "fid": []} for name in models}
    features, latency, calls, grids = {}, {}, {}, {}
    for name, path in models.items():
        pipe, calls[name] = load_pipeline(path, family, device)
        features[name], timings = [], []
        for seed in range(p.seeds):
            images, seconds = generate(pipe, calls[name], prompts, p.batch_size, seed, f"{name} seed {seed}")
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
        del pipe
    seeds = range(p.seeds)
    per_seed["student"]["fid_t"] = [fid(features["teacher"][s], features["student"][s]) for s in seeds]
    if p.seeds > 1:  # the floor: the teacher against itself under other noise
        per_seed["teacher"]["fid_t"] = [fid(features["teacher"][(s + 1) % p.seeds], features["teacher"][s]) for s in seeds]
    metrics = {name: {**over_seeds(values), "latency_ms": latency[name], "call": calls[name], "images": len(prompts)}
               for name, values in per_seed.items()}
    metrics["featurizer"] = f"{args.prepare}/featurizer at {info['resolution']}x{info['resolution']}"
    metrics["seeds"] = p.seeds
    write_scores(args.out / "samples", args.out / "metrics.json", grids, min(p.grid_size, p.per_class), metrics)
    for name in models:
        m = metrics[name]
        print(f"[judge] {name}: prompt accuracy {m['prompt_accuracy']:.3f}, FID {m['fid']:.3f}, "
              f"{m['latency_ms']:.2f} ms/image ({calls[name]})", flush=True)


def configure(ap):
    ap.add_argument("--prepare", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.sd import launch

    launch.run("judge", main, configure)
