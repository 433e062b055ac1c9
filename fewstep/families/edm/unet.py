"""The EDM family's network: the EDM-preconditioned class-conditional UNet, trained here from data.

Models are saved as diffusers-style directories:
    <dir>/unet/        UNet2DModel.save_pretrained
    <dir>/scheduler/   EDMEulerScheduler config (sigma_min, sigma_max, sigma_data, rho)
    <dir>/fewstep.json role ("teacher" / "student"), number of classes, student noise levels
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from fewstep.io import ArtifactError, first_line, read_json, tensor_shapes, write_json


if TYPE_CHECKING:  # diffusers costs seconds to import: only stages that build or load a UNet pay for it
    from diffusers import EDMEulerScheduler, UNet2DModel


def unet_channels(resolution: int) -> list[int]:
    """Halve the resolution while it stays even and >= 4 (at most 3 times): one UNet level per size."""
    widths, size = [32], resolution
    while size % 2 == 0 and size // 2 >= 4 and len(widths) < 4:
        size //= 2
        widths.append(64 if len(widths) < 3 else 128)
    return widths


def build_unet(resolution: int, channels: int, num_classes: int, widths: list[int] | None = None,
               layers_per_block: int = 2) -> UNet2DModel:
    from diffusers import UNet2DModel

    widths = widths or unet_channels(resolution)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(widths),
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        layers_per_block=layers_per_block,
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_classes + 1,  # the extra label is the null ("unconditional") class
    )


class EDMDenoiser(nn.Module):
    """D(x; sigma, label) = c_skip x + c_out F(c_in x; c_noise, label) with diffusers' EDM preconditioning."""

    def __init__(self, unet: UNet2DModel, scheduler: EDMEulerScheduler, num_classes: int):
        super().__init__()
        self.unet, self.scheduler, self.num_classes = unet, scheduler, num_classes

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.view(-1, 1, 1, 1)
        x_in = self.scheduler.precondition_inputs(x, s)
        out = self.unet(x_in, self.scheduler.precondition_noise(sigma), class_labels=labels).sample
        return self.scheduler.precondition_outputs(x, out.to(x.dtype), s)

    def guided(self, x, sigma, labels, guidance: float = 1.0):
        """Classifier-free guidance with the null label; guidance 1 is the plain conditional model."""
        if guidance == 1.0:
            return self(x, sigma, labels)
        null = torch.full_like(labels, self.null_label)
        cond, uncond = self(torch.cat([x, x]), torch.cat([torch.as_tensor(sigma).reshape(-1).expand(len(x))] * 2),
                            torch.cat([labels, null])).chunk(2)
        return uncond + guidance * (cond - uncond)


def per_step_labels(denoiser: EDMDenoiser, steps: int) -> None:
    """Give the denoiser one class-embedding table per student step (each a copy of its own), so that
    label + k * (num_classes + 1) conditions it on samples from step k (`distill.per_step_critic`)."""
    table = denoiser.unet.class_embedding
    tiled = nn.Embedding(table.num_embeddings * steps, table.embedding_dim).to(table.weight.device)
    with torch.no_grad():
        tiled.weight.copy_(table.weight.repeat(steps, 1))
    denoiser.unet.class_embedding = tiled
    denoiser.unet.register_to_config(num_class_embeds=tiled.num_embeddings)


def step_tables(denoiser: EDMDenoiser) -> int:
    return denoiser.unet.class_embedding.num_embeddings // (denoiser.num_classes + 1)


def step_labels(denoiser: EDMDenoiser, labels: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """`labels` in the table of student step `step` (one for all, or one per label; see per_step_labels)."""
    return labels + step * (denoiser.num_classes + 1)


def karras_position(edm, u: float | torch.Tensor) -> float | torch.Tensor:
    """The noise level at position u of the Karras schedule (u=0: sigma_max, u=1: sigma_min); u a number or a
    tensor of them. The EDM family's `t_min`/`t_max` and student noise levels are such positions."""
    hi, lo = edm.sigma_max ** (1 / edm.rho), edm.sigma_min ** (1 / edm.rho)
    return (hi + u * (lo - hi)) ** edm.rho


def karras_grid_sigmas(n: int, edm, t_min: float, t_max: float, generator=None, device="cpu") -> torch.Tensor:
    """Noise levels uniform in Karras-schedule position u in [t_min, t_max]: the EDM counterpart of DMD2's
    t ~ U[20, 980] out of 1000."""
    return karras_position(edm, t_min + (t_max - t_min) * torch.rand(n, generator=generator, device=device))


def make_scheduler(edm) -> EDMEulerScheduler:
    from diffusers import EDMEulerScheduler

    return EDMEulerScheduler(sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, sigma_data=edm.sigma_data, rho=edm.rho)


def save_model(denoiser: EDMDenoiser, path: Path, role: str, **info) -> None:
    path.mkdir(parents=True, exist_ok=True)
    denoiser.unet.save_pretrained(path / "unet")
    denoiser.scheduler.save_pretrained(path / "scheduler")
    write_json({"role": role, "num_classes": denoiser.num_classes, **info}, path / "fewstep.json")


ROLES = ("teacher", "student", "critic")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_info(info, file: Path) -> dict:
    if not isinstance(info, dict) or info.get("role") not in ROLES:
        role = info.get("role") if isinstance(info, dict) else info
        raise ArtifactError(f"{file}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
    n = info.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ArtifactError(f"{file}: 'num_classes' must be a positive integer, got {n!r}")
    sigmas = info.get("student_sigmas")
    if info["role"] == "student" and (not isinstance(sigmas, list) or not sigmas
                                      or not all(isinstance(x, (int, float)) and x > 0 for x in sigmas)):
        raise ArtifactError(f"{file}: a student needs 'student_sigmas', a list of positive noise levels, got {sigmas!r}")
    return info


def _unet_weights(unet_dir: Path) -> list[Path]:
    """The UNet's safetensors weight files (one file or the shards of an index).
    Pickled weights (.bin, .pt, ...) are refused by name and never opened."""
    single = unet_dir / "diffusion_pytorch_model.safetensors"
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise ArtifactError(f"{index}: 'weight_map' must map tensor names to shard files")
        files = [unet_dir / name for name in sorted(set(weight_map.values()))]
    else:
        pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ArtifactError(f"{unet_dir}: only pickled weights ({', '.join(pickles)}); fewstep loads "
                                f"safetensors only and never unpickles (convert them to {single.name})")
        raise ArtifactError(f"{unet_dir}: no weights (missing {single.name})")
    return files


def _check_fit(unet_dir: Path, config: dict, weights: list[Path]) -> None:
    """The weights' tensor names and shapes against a UNet built from config.json on the meta device
    (no memory, no init): a config that does not describe its weights is one line, not a load error.
    Reading each file's header also catches truncated or garbage files."""
    from diffusers import UNet2DModel

    try:
        with torch.device("meta"):
            expected = {k: list(v.shape) for k, v in UNet2DModel.from_config(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise ArtifactError(f"{unet_dir / 'config.json'}: not a valid UNet2DModel config ({first_line(exc)})") from None
    found = {}
    for file in weights:
        found |= tensor_shapes(file)
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            raise ArtifactError(f"{unet_dir}: weights do not fit config.json ({key} is {found[key]}, "
                                f"config.json gives {shape})")
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ArtifactError(f"{unet_dir}: weights do not fit config.json ({what}; "
                            f"{len(missing)} missing, {len(unexpected)} unexpected tensors)")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EDMDenoiser, dict]:
    """A fewstep model directory (see the module docstring), checked before anything is built: one
    ArtifactError line for a missing, foreign, truncated, pickled or mismatched model."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such model directory (did the upstream stage run?)")
    for part in ("fewstep.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if not (path / part).is_file():
            raise ArtifactError(f"{path}: not a fewstep model directory (missing {part})")
    info = _check_info(read_json(path / "fewstep.json"), path / "fewstep.json")
    unet_dir = path / "unet"
    config = read_json(unet_dir / "config.json")
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "UNet2DModel":
        raise ArtifactError(f"{unet_dir / 'config.json'}: _class_name is {kind!r}, expected 'UNet2DModel'")
    tables = info.get("step_tables", 1)
    if config.get("num_class_embeds") != (info["num_classes"] + 1) * tables:
        raise ArtifactError(f"{path / 'fewstep.json'}: num_classes {info['num_classes']} (x {tables} step tables) "
                            f"does not fit the UNet's num_class_embeds {config.get('num_class_embeds')!r} "
                            "(classes + the null label, per table)")
    weights = _unet_weights(unet_dir)

    from diffusers import EDMEulerScheduler, UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warnings would bury the one line we raise
    try:
        _check_fit(unet_dir, config, weights)
        try:  # use_safetensors=True: diffusers never falls back to a pickled .bin
            unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)
            scheduler = EDMEulerScheduler.from_pretrained(path / "scheduler")
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise ArtifactError(f"{path}: cannot load the model ({first_line(exc)})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    denoiser = EDMDenoiser(unet, scheduler, info["num_classes"]).to(device).eval()
    return denoiser, info
