"""trajectories: the teacher's deterministic ODE solves (EDM Heun, CFG at trajectories.guidance) from seeded
noise, for every family (`--family`: its teacher-solve module). The family names its splits: the EDM family one
`train` split of class labels in turn (its distillation pairs and the evaluation's teacher side); text-to-image
families the train prompts in turn (`num_samples`) and every held-out prompt (`eval_per_prompt` each, the
evaluation's teacher side). Sharded safetensors in one layout (fewstep.io.load_trajectories reads it):

    <out>/index.json                     sampling_steps, guidance, nfe, sigmas, keep_states, {split: shards}
    <out>/<split>-NNNNN.safetensors      noise, cond_index, samples[, states: every Heun state]
"""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep.core import runtime, stage
from fewstep.files import atomic_output
from fewstep.io import save_shard, write_json
from fewstep.core.sampling import TeacherSplit, heun_sample, teacher_nfe


def solve(teacher, split: TeacherSplit, noise_shape: tuple[int, ...], seed: int, p, out: Path,
          device) -> tuple[list[dict], list[float]]:
    """The split's teacher samples, written in shards of trajectories.shard_size; returns the shard list and
    the sigmas of the Heun steps."""
    cond_index = torch.arange(split.count) % split.num_conditions
    noise = torch.randn((split.count, *noise_shape), generator=runtime.seeded(seed, split.noise_stream))
    shards = []
    for start in tqdm(range(0, split.count, p.shard_size), desc=f"{split.name} shards", unit="shard"):
        stop = min(start + p.shard_size, split.count)
        samples, states = [], []
        for b in range(start, stop, p.batch_size):
            rows = slice(b, min(b + p.batch_size, stop))
            x, s, sigmas = heun_sample(teacher, noise[rows].to(device), split.conditions(cond_index[rows]).to(device),
                                       p.sampling_steps, p.guidance, keep_states=True)
            samples.append(x.cpu())
            states.append(s.cpu())
        tensors = {"noise": noise[start:stop], "cond_index": cond_index[start:stop], "samples": torch.cat(samples)}
        if p.keep_states:
            tensors["states"] = torch.cat(states)
        save_shard(tensors, out, split.name, shards)
    return shards, [float(s) for s in sigmas]


def main(params, args, device, family):
    p = params.trajectories
    teacher, noise_shape, splits = family.teacher_splits(params, args, device)
    nfe = teacher_nfe(p.sampling_steps, p.guidance)
    counts = " + ".join(f"{s.count} {s.name}" for s in splits)
    print(f"[trajectories] {counts} teacher samples, {p.sampling_steps} Heun steps, guidance {p.guidance} "
          f"({nfe} network evaluations each)", flush=True)
    index = {"sampling_steps": p.sampling_steps, "guidance": p.guidance, "nfe": nfe, "keep_states": p.keep_states}
    with atomic_output(args.out) as out:
        out.mkdir()
        for split in splits:
            shards, index["sigmas"] = solve(teacher, split, noise_shape, params.seed, p, out, device)
            index[split.name] = {"num_samples": split.count, "shards": shards}
        write_json(index, out / "index.json")
    print(f"[trajectories] -> {args.out}", flush=True)


def configure(ap):
    ap.add_argument("--out", type=Path, required=True)


if __name__ == "__main__":
    stage.run_stage("trajectories", main, configure, stage.TEACHER_SOLVES)
