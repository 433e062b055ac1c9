"""Networks: the EDM-preconditioned class-conditional UNet, the evaluation featurizer, the GAN head.

Models are saved as diffusers-style directories:
    <dir>/unet/        UNet2DModel.save_pretrained
    <dir>/scheduler/   EDMEulerScheduler config (sigma_min, sigma_max, sigma_data, rho)
    <dir>/fewstep.json role ("teacher" / "student"), number of classes, student noise levels
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import EDMEulerScheduler, UNet2DModel

from .io import ArtifactError, load_tensors, read_json, save_tensors, write_json


def unet_channels(resolution: int) -> list[int]:
    """Halve the resolution while it stays even and >= 4 (at most 3 times): one UNet level per size."""
    widths, size = [32], resolution
    while size % 2 == 0 and size // 2 >= 4 and len(widths) < 4:
        size //= 2
        widths.append(64 if len(widths) < 3 else 128)
    return widths


def build_unet(resolution: int, channels: int, num_classes: int, widths: list[int] | None = None,
               layers_per_block: int = 2) -> UNet2DModel:
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


def make_scheduler(edm) -> EDMEulerScheduler:
    return EDMEulerScheduler(sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, sigma_data=edm.sigma_data, rho=edm.rho)


def save_model(denoiser: EDMDenoiser, path: Path, role: str, **info) -> None:
    path.mkdir(parents=True, exist_ok=True)
    denoiser.unet.save_pretrained(path / "unet")
    denoiser.scheduler.save_pretrained(path / "scheduler")
    write_json({"role": role, "num_classes": denoiser.num_classes, **info}, path / "fewstep.json")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EDMDenoiser, dict]:
    path = Path(path)
    for part in ("fewstep.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if not (path / part).is_file():
            raise ArtifactError(f"{path}: not a fewstep model directory (missing {part})")
    info = read_json(path / "fewstep.json")
    try:
        unet = UNet2DModel.from_pretrained(path / "unet")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path / 'unet'}: cannot load the UNet ({str(exc).splitlines()[0]})") from None
    scheduler = EDMEulerScheduler.from_pretrained(path / "scheduler")
    denoiser = EDMDenoiser(unet, scheduler, info["num_classes"]).to(device).eval()
    return denoiser, info


# --- Evaluation featurizer ------------------------------------------------------------------------


class Featurizer(nn.Module):
    """A small classifier trained on real data: penultimate features for FID / precision / recall,
    logits for conditioning accuracy. `num_features` lets torchmetrics use it as FID's feature module."""

    def __init__(self, channels: int, num_classes: int, features: int = 128):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "features": features}
        self.num_features = features
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, features), nn.SiLU(),
        )
        self.head = nn.Linear(features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(self.state_dict(), path / "featurizer.safetensors")
        write_json(self.config, path / "featurizer.json")

    @classmethod
    def load(cls, path: Path) -> "Featurizer":
        model = cls(**read_json(path / "featurizer.json"))
        _load_state(model, path / "featurizer.safetensors")
        return model.eval()


# --- GAN head on the fake-score UNet's bottleneck ---------------------------------------------------


class GanHead(nn.Module):
    """DMD2's discriminator head: conv 4x4 stride 2 -> GroupNorm -> SiLU -> 1x1 conv logit, averaged."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        self.config = {"in_channels": in_channels, "width": width}
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=(1, 2, 3))

    def save(self, path: Path) -> None:
        save_tensors(self.state_dict(), path / "gan_head.safetensors")
        write_json(self.config, path / "gan_head.json")

    @classmethod
    def load(cls, path: Path) -> "GanHead":
        head = cls(**read_json(path / "gan_head.json"))
        _load_state(head, path / "gan_head.safetensors")
        return head


class BottleneckTap:
    """Keeps the latest output of a UNet's mid-block (the GAN head's input) via a forward hook."""

    def __init__(self, unet: UNet2DModel):
        self.features: torch.Tensor | None = None
        unet.mid_block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.features = output


def _load_state(model: nn.Module, file: Path) -> None:
    state = load_tensors(file)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{file}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
