"""Optional image metrics of the SD evaluate stage, each from a local model the user points at:
CLIP score (torchmetrics, a CLIP directory) and FID (fewstep.distances, a featurizer + reference images).
A metric whose inputs are not configured is skipped with a notice saying what would enable it."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..io import ArtifactError
from .prompts import image_tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _ClipFeatures(nn.Module):
    """transformers 5 returns output objects from get_*_features (the projected embedding in
    pooler_output); torchmetrics' CLIP score expects the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score(clip_path: str, images: torch.Tensor, prompts: list[str], batch_size: int) -> float:
    """torchmetrics CLIPScore (100 * cosine of CLIP image and text embeddings) from a local CLIP directory."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if not Path(clip_path).is_dir():
        raise ArtifactError(f"evaluate.clip_path: {clip_path} is not a local CLIP model directory")
    metric = CLIPScore(model_name_or_path=lambda: (_ClipFeatures(CLIPModel.from_pretrained(clip_path)),
                                                   CLIPProcessor.from_pretrained(clip_path)))
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            metric.update(uint8(images[start:start + batch_size]), prompts[start:start + batch_size])
    return float(metric.compute())


def load_featurizer(path: str, resolution: int) -> nn.Module:
    """A torch.export program (.pt2, batch dimension dynamic), a TorchScript module, or a fewstep featurizer
    directory (e.g. the digits pipeline's prepare/featurizer)."""
    from ..models import Featurizer

    p = Path(path)
    if p.is_dir() and (p / "featurizer.json").is_file():
        return Featurizer.load(p)
    try:
        net = torch.export.load(str(p)).module() if p.suffix == ".pt2" else torch.jit.load(str(p), map_location="cpu")
        with torch.no_grad():  # it must take this resolution's images: say so at load, in this line
            net(torch.zeros(1, 3, resolution, resolution))
        return net
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"evaluate.fid.featurizer: {path} is not a torch.export program (.pt2), a TorchScript "
                            f"module or a fewstep featurizer directory ({str(exc).splitlines()[0]})") from None


def reference_images(folder: str, resolution: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if Path(folder).is_dir() else []
    if len(files) < 2:
        raise ArtifactError(f"evaluate.fid.reference: {folder} holds {len(files)} images; FID needs at least 2")
    return image_tensor([Image.open(f) for f in files], resolution)


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, D) features of images in [-1, 1] from a loaded featurizer, computed once per image set so that FID
    against the reference and fidelity to the teacher share them."""
    return torch.cat([net(chunk.float()).float() for chunk in images.split(batch_size)])


# --- fidelity to the teacher: needs nothing but the teacher -----------------------------------------

FEATURE_TIMESTEP = 200  # DDPM timestep at which the teacher's UNet looks at a sample for its features


@torch.no_grad()
def teacher_features(teacher: nn.Module, latents: torch.Tensor, cond, batch_size: int, device,
                     seed: int) -> torch.Tensor:
    """(N, C) features every SD teacher gives with no other model: its UNet's mid-block output averaged over
    space, for each latent noised to FEATURE_TIMESTEP (a fixed noise per image) under its own prompt. What
    the teacher's denoiser sees of a sample; the stand-in for Inception when evaluate.fid.featurizer is unset."""
    from ..sampling import batched

    captured: list[torch.Tensor] = []
    hook = teacher.unet.mid_block.register_forward_hook(
        lambda module, args, out: captured.append(out.float().mean(dim=(2, 3)).cpu()))
    try:
        sigma = teacher.sigma_of(FEATURE_TIMESTEP)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        batched(lambda x, c: teacher(x, sigma, c), latents.float() + sigma * noise, cond, batch_size, device)
    finally:
        hook.remove()
    return torch.cat(captured)


def halves(count: int, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the first and the second half of the evaluation rounds (row i is round i // prompts of prompt
    i % prompts): the same prompts in both halves, under different noise."""
    prompts = count // rounds
    cut = (rounds // 2) * prompts
    return torch.arange(cut), torch.arange(cut, 2 * cut)


def fidelity(features: dict[str, torch.Tensor], images: dict[str, torch.Tensor], rounds: int) -> dict[str, dict]:
    """FID-T and KID-T (and pixel W1 to the teacher's images): each model's first-half samples against the
    teacher's second half. The teacher's own first half against its second is the floor: same prompts, other
    noise. Both halves hold as many images, so the student's numbers compare with the teacher's."""
    from ..distances import fid, kid, pixel_view

    first, second = halves(len(features["teacher"]), rounds)
    reference, reference_images = features["teacher"][second], images["teacher"][second]
    return {name: {"fid_t": fid(reference, f[first]), "kid_t": kid(reference, f[first]),
                   "pixel_w1_t": pixel_view(images[name][first], reference_images)["pixel_w1"]}
            for name, f in features.items()}
