"""trajectories: deterministic teacher ODE solves (noise, label) -> image, every Heun state kept,
as sharded safetensors. Feeds the teacher's evaluation and regression/consistency objectives."""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep import runtime
from fewstep.io import atomic_output, save_tensors, write_json
from fewstep.models import load_model
from fewstep.sampling import heun_sample


def main(params, args, device):
    p = params.trajectories
    teacher, info = load_model(args.teacher, device)
    gen = runtime.seeded(params.seed, "trajectories")
    c, size = teacher.unet.config.in_channels, teacher.unet.config.sample_size
    labels = torch.arange(p.num_samples) % teacher.num_classes  # balanced classes, grid-friendly order
    noise = torch.randn((p.num_samples, c, size, size), generator=gen)
    nfe = 2 * p.sampling_steps - 1
    print(f"[trajectories] {p.num_samples} teacher samples, {p.sampling_steps} Heun steps ({nfe} NFE), "
          f"guidance {p.guidance}", flush=True)
    with atomic_output(args.out) as out:
        out.mkdir()
        shards = []
        for start in tqdm(range(0, p.num_samples, p.shard_size), desc="shards", unit="shard"):
            stop = min(start + p.shard_size, p.num_samples)
            batches = [slice(i, min(i + p.batch_size, stop)) for i in range(start, stop, p.batch_size)]
            parts = [heun_sample(teacher, noise[b].to(device), labels[b].to(device), p.sampling_steps, p.guidance,
                                 keep_states=True) for b in batches]
            name = f"shard-{len(shards):05d}.safetensors"
            save_tensors({"noise": noise[start:stop], "labels": labels[start:stop],
                          "images": torch.cat([x for x, _, _ in parts]),
                          "states": torch.cat([s for _, s, _ in parts])}, out / name)
            shards.append({"file": name, "count": stop - start})
        sigmas = parts[0][2].tolist()
        write_json({"num_samples": p.num_samples, "sampling_steps": p.sampling_steps, "nfe": nfe,
                    "guidance": p.guidance, "sigmas": sigmas, "shards": shards}, out / "index.json")
    print(f"[trajectories] {len(shards)} shards -> {args.out}", flush=True)


def configure(ap):
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    runtime.run("trajectories", main, configure)
