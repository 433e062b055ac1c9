"""The teacher: an existing diffusers Stable Diffusion pipeline directory, checked before anything loads.

Stages load only the parts they need — encode the text encoders and the VAE, the training stages only
the UNet and the scheduler config — so a training stage never instantiates a text encoder or the VAE.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..io import ArtifactError, read_json
from ..params import ParamsError

# family -> (pipeline classes accepted in model_index.json, components the directory must have)
FAMILIES = {
    "sdxl": ({"StableDiffusionXLPipeline"},
             ("unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")),
    "sd15": ({"StableDiffusionPipeline"}, ("unet", "vae", "scheduler", "text_encoder", "tokenizer")),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


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
    classes, components = FAMILIES[family]
    found = read_json(local / "model_index.json").get("_class_name")
    if found not in classes:
        other = next((f for f, (c, _) in FAMILIES.items() if found in c), None)
        hint = f"; set teacher.family: {other}" if other else ""
        raise ArtifactError(f"teacher.path: {path} holds a {found}, not an {family.upper()} pipeline "
                            f"({' or '.join(sorted(classes))}){hint}")
    missing = [c for c in components if not (local / c).is_dir()]
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


def load_unet(path: Path, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path / 'unet'}: cannot load the UNet ({str(exc).splitlines()[0]})") from None


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(path, subfolder="vae")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path / 'vae'}: cannot load the VAE ({str(exc).splitlines()[0]})") from None


def scheduler_config(path: Path) -> dict:
    return read_json(path / "scheduler" / "scheduler_config.json")


def load_text_pipeline(path: Path, family: str):
    """The pipeline with its tokenizers and text encoders only (no UNet, no VAE): for `encode_prompt`."""
    extra = {"safety_checker": None, "feature_extractor": None} if family == "sd15" else {}
    try:
        return pipeline_class(family).from_pretrained(path, unet=None, vae=None, **extra)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: cannot load the text encoders ({str(exc).splitlines()[0]})") from None


def vae_factor(path: Path) -> int:
    """How much the VAE downsamples: 2 per level after the first (8 for SD / SDXL)."""
    return 2 ** (len(read_json(path / "vae" / "config.json")["block_out_channels"]) - 1)


def native_resolution(path: Path) -> int:
    """The teacher's default image side: UNet sample size times the VAE's downsampling factor."""
    return int(read_json(path / "unet" / "config.json")["sample_size"]) * vae_factor(path)


def latent_shape(path: Path, resolution: int) -> list[int]:
    factor = vae_factor(path)
    if resolution % factor:
        raise ParamsError(f"encode.resolution must be a multiple of the VAE's factor {factor}, got {resolution}")
    return [int(read_json(path / "unet" / "config.json")["in_channels"]), resolution // factor, resolution // factor]
