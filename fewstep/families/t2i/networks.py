"""SD denoisers built from the teacher directory and the encode cache, and the student / critic layout:

    <dir>/unet/          the network's save_pretrained (a LoRA student is saved merged); <dir>/transformer/
                         for a transformer family (SD3)
    <dir>/fewstep.json   role, the student's conditioning timesteps, the teacher it came from
    <dir>/gan_head.*     the critic's GAN head (critic directories only)
"""
from __future__ import annotations

from pathlib import Path

import torch

from fewstep.io import ArtifactError, read_json, write_json
from fewstep.families.t2i import variants, teacher as teachers
from fewstep.families.t2i.sd_denoiser import SDCond, SDDenoiser

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def denoiser(network, teacher_path: Path, negative: SDCond | None, device, precision: str = "fp32",
             checkpointing: bool = False) -> SDDenoiser:
    """The network behind its family's denoiser, on the teacher's training schedule."""
    if checkpointing:
        network.enable_gradient_checkpointing()
    family = variants.of_teacher(teacher_path)
    return family.denoiser(network, teachers.scheduler_config(teacher_path), negative,
                           autocast_dtype=AUTOCAST[precision]).to(device)


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
    model.__class__ = _lora_class(type(model))  # same state, LoRA-only parameters
    for p in model.parameters():
        p.data = p.data.float()  # the optimizer keeps fp32 adapters even over a bf16 base
    return model


_LORA_CLASSES: dict[type, type] = {SDDenoiser: LoraDenoiser}


def _lora_class(cls: type) -> type:
    """LoraDenoiser over the denoiser's own class (a flow denoiser keeps its velocity -> x0 forward)."""
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraDenoiser, cls), {"__module__": __name__})
    return _LORA_CLASSES[cls]


def frozen_dtype(device, precision: str) -> torch.dtype:
    """Weights nobody trains (the teacher, a LoRA student's base) are stored in the autocast dtype on GPU."""
    dtype = AUTOCAST[precision]
    return dtype if dtype is not None and torch.device(device).type != "cpu" else torch.float32


def teacher_network(teacher_path: Path, dtype: torch.dtype = torch.float32):
    """The teacher directory's denoising network (what the teacher, a fresh student and a fresh fake score start as)."""
    return teachers.load_network(teacher_path, variants.of_teacher(teacher_path).name, dtype)


def teacher_denoiser(teacher_path: Path, negative: SDCond, device, precision: str = "fp32") -> SDDenoiser:
    """The frozen real score. On GPU with bf16/fp16 its weights are stored in that dtype (half the memory)."""
    model = denoiser(teacher_network(teacher_path, frozen_dtype(device, precision)), teacher_path, negative, device,
                     precision)
    return model.requires_grad_(False).eval()


def save(model: SDDenoiser, path: Path, role: str, **info) -> None:
    path.mkdir(parents=True, exist_ok=True)
    network = model.merged_unet() if isinstance(model, LoraDenoiser) else model.unet
    network.save_pretrained(path / variants.of_network(network).network)
    write_json({"role": role, **info}, path / "fewstep.json")


def load(path: Path, teacher_path: Path, negative: SDCond | None, device, precision: str = "fp32",
         checkpointing: bool = False, dtype: torch.dtype = torch.float32) -> tuple[SDDenoiser, dict]:
    family = variants.of_teacher(teacher_path)
    for part in ("fewstep.json", f"{family.network}/config.json"):
        if not (path / part).is_file():
            raise ArtifactError(f"{path}: not a fewstep {family.name.upper()} model directory (missing {part})")
    network = teachers.load_network(path, family.name, dtype)
    return denoiser(network, teacher_path, negative, device, precision, checkpointing), read_json(path / "fewstep.json")
