"""SD denoisers built from the teacher directory and the encode cache, and the student / critic layout:

    <dir>/unet/          UNet2DConditionModel.save_pretrained (a LoRA student is saved merged)
    <dir>/fewstep.json   role, the student's conditioning timesteps, the teacher it came from
    <dir>/gan_head.*     the critic's GAN head (critic directories only)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import ArtifactError, read_json, write_json
from . import teacher as teachers
from .denoiser import SDCond, SDDenoiser, alphas_cumprod

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def schedule(teacher_path: Path) -> torch.Tensor:
    """abar_t of the teacher's training schedule."""
    return alphas_cumprod(teachers.scheduler_config(teacher_path))


def denoiser(unet, teacher_path: Path, negative: SDCond | None, device, precision: str = "fp32",
             checkpointing: bool = False) -> SDDenoiser:
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return SDDenoiser(unet, schedule(teacher_path), negative, autocast_dtype=AUTOCAST[precision]).to(device)


class LoraDenoiser(SDDenoiser):
    """A student trained through LoRA adapters (peft, via diffusers' `add_adapter`): its parameters, as
    the trainer's optimizer, EMA, gradient clipping and requires_grad_ see them, are the adapters only,
    so the base UNet stays frozen. `merged_unet` folds the adapters in for saving."""

    def parameters(self, recurse: bool = True):
        return (p for name, p in self.unet.named_parameters() if "lora_" in name)

    def requires_grad_(self, requires_grad: bool = True):
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def merged_unet(self):
        import copy

        unet = copy.deepcopy(self.unet)
        unet.fuse_lora()
        unet.unload_lora()
        return unet


def with_lora(model: SDDenoiser, rank: int, alpha: float | None, target_modules: list[str]) -> LoraDenoiser:
    from peft import LoraConfig

    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                      target_modules=list(target_modules)))
    model.__class__ = LoraDenoiser  # same state, LoRA-only parameters
    for p in model.parameters():
        p.data = p.data.float()  # the optimizer keeps fp32 adapters even over a bf16 base
    return model


def frozen_dtype(device, precision: str) -> torch.dtype:
    """Weights nobody trains (the teacher, a LoRA student's base) are stored in the autocast dtype on GPU."""
    dtype = AUTOCAST[precision]
    return dtype if dtype is not None and torch.device(device).type != "cpu" else torch.float32


def teacher_nfe(steps: int, guidance: float) -> int:
    """UNet evaluations per teacher sample: Heun's 2 * steps - 1, twice over under CFG."""
    return (2 * steps - 1) * (1 if guidance == 1 else 2)


def teacher_denoiser(teacher_path: Path, negative: SDCond, device, precision: str = "fp32") -> SDDenoiser:
    """The frozen real score. On GPU with bf16/fp16 its weights are stored in that dtype (half the memory)."""
    model = denoiser(teachers.load_unet(teacher_path, frozen_dtype(device, precision)), teacher_path, negative, device,
                     precision)
    return model.requires_grad_(False).eval()


def save(model: SDDenoiser, path: Path, role: str, **info) -> None:
    path.mkdir(parents=True, exist_ok=True)
    unet = model.merged_unet() if isinstance(model, LoraDenoiser) else model.unet
    unet.save_pretrained(path / "unet")
    write_json({"role": role, **info}, path / "fewstep.json")


def load(path: Path, teacher_path: Path, negative: SDCond | None, device, precision: str = "fp32",
         checkpointing: bool = False, dtype: torch.dtype = torch.float32) -> tuple[SDDenoiser, dict]:
    from diffusers import UNet2DConditionModel

    for part in ("fewstep.json", "unet/config.json"):
        if not (path / part).is_file():
            raise ArtifactError(f"{path}: not a fewstep SD model directory (missing {part})")
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path / 'unet'}: cannot load the UNet ({str(exc).splitlines()[0]})") from None
    return denoiser(unet, teacher_path, negative, device, precision, checkpointing), read_json(path / "fewstep.json")
