"""The teacher: an existing diffusers text-to-image pipeline directory (SDXL, SD1.5, SD3), checked before anything loads.

Stages load only the parts they need — encode the text encoders and the VAE, the training stages only
the denoising network and the scheduler config — so a training stage never instantiates a text encoder or the VAE.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fewstep.io import ArtifactError, read_json
from fewstep.params import ParamsError
from fewstep.families.t2i import variants

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(path: str, family: str) -> Path:
    """The local teacher directory, validated. A hub id is fetched when a network is allowed; otherwise
    (and for every other problem) one line says what is wrong."""
    local = Path(path)
    if not local.exists():
        if _HUB_ID.match(path) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
            local = _download(path)
        else:
            raise ArtifactError(f"teacher.path: {path} does not exist (expected a local diffusers "
                                f"{family.upper()} pipeline directory)")
    if not local.is_dir():
        raise ArtifactError(f"teacher.path: {path} is a file, not a diffusers pipeline directory")
    if not (local / "model_index.json").is_file():
        raise ArtifactError(f"teacher.path: {path} is not a diffusers pipeline directory (no model_index.json)")
    expected = variants.get(family)
    found = read_json(local / "model_index.json").get("_class_name")
    if found != expected.pipeline:
        other = next((f.name for f in variants.FAMILIES.values() if found == f.pipeline), None)
        hint = f"; set teacher.family: {other}" if other else ""
        raise ArtifactError(f"teacher.path: {path} holds a {found}, not an {family.upper()} pipeline "
                            f"({expected.pipeline}){hint}")
    missing = [c for c in expected.components if not (local / c).is_dir()]
    if missing:
        raise ArtifactError(f"teacher.path: {path} is not a complete {family.upper()} pipeline (missing {', '.join(missing)})")
    return local


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                      ignore_patterns=["*.fp16.safetensors", "*/diffusion_pytorch_model.fp16*"]))
    except Exception as exc:  # the hub raises many types (offline, not found, gated); one line each
        raise ArtifactError(f"teacher.path: {repo_id} is not a local directory and could not be fetched "
                            f"from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def load_network(path: Path, family: str, dtype: torch.dtype = torch.float32):
    """The denoising network (a UNet, or a transformer) of a teacher, student or critic directory."""
    folder = Path(path) / variants.get(family).network
    try:
        return variants.get(family).network_class().from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{folder}: cannot load the {family.upper()} network ({str(exc).splitlines()[0]})") from None


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(path, subfolder="vae")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path / 'vae'}: cannot load the VAE ({str(exc).splitlines()[0]})") from None


def scheduler_config(path: Path) -> dict:
    return read_json(path / "scheduler" / "scheduler_config.json")


def load_text_pipeline(path: Path, family: str):
    """The pipeline with its tokenizers and text encoders only (no denoising network, no VAE): for `encode_prompt`."""
    f = variants.get(family)
    try:
        return f.pipeline_class().from_pretrained(path, **{f.network: None, "vae": None}, **pipeline_kwargs(path, family))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: cannot load the text encoders ({str(exc).splitlines()[0]})") from None


def pipeline_kwargs(path: Path, family: str) -> dict:
    """from_pretrained's extra arguments: the family's, and None for each component the directory saved as absent
    (an SD3 directory without T5 lists text_encoder_3: [null, null], which from_pretrained will not fill itself)."""
    index = read_json(path / "model_index.json")
    absent = {name: None for name, entry in index.items() if entry == [None, None]}
    return {**absent, **dict(variants.get(family).pipeline_kwargs)}


def vae_factor(path: Path) -> int:
    """How much the VAE downsamples: 2 per level after the first (8 for SD / SDXL)."""
    return 2 ** (len(read_json(path / "vae" / "config.json")["block_out_channels"]) - 1)


def network_config(path: Path) -> dict:
    """The teacher network's config.json."""
    return read_json(path / variants.of_teacher(path).network / "config.json")


def native_resolution(path: Path) -> int:
    """The teacher's default image side: the network's sample size times the VAE's downsampling factor."""
    return int(network_config(path)["sample_size"]) * vae_factor(path)


def latent_shape(path: Path, resolution: int, family: str) -> list[int]:
    factor = vae_factor(path)
    if resolution % factor:
        raise ParamsError(f"encode.resolution must be a multiple of the VAE's factor {factor}, got {resolution}")
    config = network_config(path)
    problem = variants.get(family).check_latent_side(config, resolution // factor)
    if problem:
        raise ParamsError(f"encode.resolution {resolution}: {problem}")
    return [int(config["in_channels"]), resolution // factor, resolution // factor]
