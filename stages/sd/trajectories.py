"""trajectories: the teacher's deterministic ODE (EDM Heun on its own noise range, CFG at
trajectories.guidance) in latent space, from seeded noise: train prompts in turn (num_samples) and every
held-out prompt (eval_per_prompt each, the evaluation's teacher side). Sharded safetensors."""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep import runtime
from fewstep.io import atomic_output, save_tensors, write_json
from fewstep.sampling import heun_sample
from fewstep.sd import models, teacher
from fewstep.sd.store import Encoded


def solve(model, encoded: Encoded, prompt_index: torch.Tensor, noise: torch.Tensor, p, out: Path, split: str,
          device) -> tuple[list[dict], list[float]]:
    """Teacher samples for (noise, prompt) pairs, written in shards; returns the shard list and sigmas."""
    shards, sigmas = [], []
    for start in tqdm(range(0, len(noise), p.shard_size), desc=f"{split} shards", unit="shard"):
        stop = min(start + p.shard_size, len(noise))
        latents, states = [], []
        for b in range(start, stop, p.batch_size):
            rows = slice(b, min(b + p.batch_size, stop))
            x, s, sigmas = heun_sample(model, noise[rows].to(device), encoded.cond[prompt_index[rows]].to(device),
                                       p.sampling_steps, p.guidance, keep_states=True)
            latents.append(x.cpu())
            states.append(s.cpu())
        tensors = {"noise": noise[start:stop], "prompt_index": prompt_index[start:stop], "latents": torch.cat(latents)}
        if p.keep_states:
            tensors["states"] = torch.cat(states)
        name = f"{split}-{len(shards):05d}.safetensors"
        save_tensors(tensors, out / name)
        shards.append({"file": name, "count": stop - start})
    return shards, [float(s) for s in sigmas]


def main(params, args, device):
    p = params.trajectories
    path = teacher.resolve(params.teacher.path, params.teacher.family)
    splits = {name: Encoded.load(args.encode, name) for name in ("train", "eval")}
    model = models.teacher_denoiser(path, splits["train"].negative, device, params.run.precision)
    nfe = models.teacher_nfe(p.sampling_steps, p.guidance)
    print(f"[trajectories] {p.num_samples} train + {len(splits['eval'].texts) * p.eval_per_prompt} eval teacher "
          f"samples, {p.sampling_steps} Heun steps, guidance {p.guidance} ({nfe} network evaluations each)", flush=True)
    shape = splits["train"].index["latent_shape"]
    index = {"sampling_steps": p.sampling_steps, "guidance": p.guidance, "nfe": nfe}
    with atomic_output(args.out) as out:
        out.mkdir()
        for name, count in (("train", p.num_samples), ("eval", len(splits["eval"].texts) * p.eval_per_prompt)):
            encoded = splits[name]
            prompt_index = torch.arange(count) % len(encoded.texts)  # every prompt in turn
            noise = torch.randn((count, *shape), generator=runtime.seeded(params.seed, f"trajectories-{name}"))
            shards, sigmas = solve(model, encoded, prompt_index, noise, p, out, name, device)
            index[name] = {"num_samples": count, "shards": shards}
        index["sigmas"] = sigmas
        write_json(index, out / "index.json")
    print(f"[trajectories] -> {args.out}", flush=True)


def configure(ap):
    ap.add_argument("--encode", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    from fewstep.sd import launch

    launch.run("trajectories", main, configure)
