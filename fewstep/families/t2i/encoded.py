"""The encode stage's cache: text conditioning and real-image latents as sharded safetensors.

    <encode>/index.json               family, resolution, latent shape, SDXL time ids, prompts, shard list
    <encode>/negative.safetensors     the negative-prompt embedding (CFG's unconditional branch)
    <encode>/{train,eval}-NNNNN.safetensors   embeds, pooled (SDXL), latents (when real images are given)

Every later stage reads conditioning from here: none of them runs a text encoder or the VAE encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.io import ArtifactError, load_tensors, read_json, save_tensors
from fewstep.families.t2i.sd_denoiser import SDCond

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_cond(cond: SDCond, path: Path, dtype: torch.dtype) -> None:
    tensors = {"embeds": cond.embeds, "pooled": cond.pooled}
    save_tensors({k: v.to(dtype) for k, v in tensors.items() if v is not None}, path)


@dataclass
class Encoded:
    """One split of the cache, in memory: conditioning for every prompt, and real latents if cached."""

    texts: list[str]
    cond: SDCond
    latents: torch.Tensor | None
    negative: SDCond
    index: dict

    @classmethod
    def load(cls, folder: str | Path, split: str = "train") -> "Encoded":
        folder = Path(folder)
        index = read_json(folder / "index.json")
        if split not in index:
            raise ArtifactError(f"{folder / 'index.json'}: no {split!r} split (found {sorted(index)})")
        shards = [load_tensors(folder / s["file"], required=("embeds",)) for s in index[split]["shards"]]
        column = lambda key: torch.cat([s[key] for s in shards]).float() if key in shards[0] else None
        n = len(index[split]["prompts"])
        time_ids = torch.tensor(index["time_ids"], dtype=torch.float32).expand(n, -1) if index["time_ids"] else None
        cond = SDCond(column("embeds"), column("pooled"), time_ids)
        neg = load_tensors(folder / "negative.safetensors", required=("embeds",))
        negative = SDCond(neg["embeds"].float(), neg["pooled"].float() if "pooled" in neg else None)
        assert len(cond) == n, f"{folder}: {len(cond)} cached embeddings for {n} {split} prompts"
        return cls(index[split]["prompts"], cond, column("latents"), negative, index)


class CondSampler:
    """Random conditioning batches (uniform over the cached prompts) from a seeded generator."""

    def __init__(self, encoded: Encoded, generator: torch.Generator, device: torch.device):
        self.cond, self.generator, self.device = encoded.cond, generator, device

    def indices(self, n: int) -> torch.Tensor:
        return torch.randint(len(self.cond), (n,), generator=self.generator)

    def __call__(self, n: int) -> SDCond:
        return self.cond[self.indices(n)].to(self.device)
