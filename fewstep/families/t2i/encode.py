"""Text conditioning through the teacher pipeline's own `encode_prompt` (so cached embeddings are exactly
what the exported pipeline feeds its UNet), and images <-> latents through the teacher's VAE."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fewstep.families.t2i import variants
from fewstep.families.t2i.sd_denoiser import SDCond


@torch.no_grad()
def encode_texts(pipe, texts: list[str], family: str, batch_size: int, device: torch.device,
                 progress: bool = True) -> SDCond:
    """Prompt embeddings (SDXL, SD3: the encoders' hidden states concatenated, plus the pooled embedding)."""
    f = variants.get(family)
    parts = []
    for start in tqdm(range(0, len(texts), batch_size), desc="prompts", unit="batch", mininterval=1.0,
                      disable=not progress):
        batch = texts[start:start + batch_size]
        out = pipe.encode_prompt(batch, **dict(f.prompt_kwargs), device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        parts.append(SDCond(out[0].float().cpu(), out[2].float().cpu() if f.pooled else None))
    return SDCond.cat(parts)


@torch.no_grad()
def encode_negative(pipe, negative_prompt: str, family: str, device: torch.device) -> SDCond:
    """The unconditional branch, as the pipeline builds it: an empty negative prompt is None, which SDXL
    turns into zeros (force_zeros_for_empty_prompt) and SD1.5 and SD3 into the empty string's embedding."""
    f = variants.get(family)
    out = pipe.encode_prompt([""], **dict(f.prompt_kwargs), device=device, num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=negative_prompt or None)
    return SDCond(out[1].float().cpu(), out[3].float().cpu() if f.pooled else None)


def sdxl_time_ids(resolution: int) -> list[float]:
    """SDXL's micro-conditioning for an uncropped square image: original size, crop corner, target size —
    the pipeline's defaults for height = width = resolution."""
    return [float(resolution), float(resolution), 0.0, 0.0, float(resolution), float(resolution)]


def _shift(vae) -> float:
    """SD3's VAE centres its latents (shift_factor) before scaling them; SD / SDXL VAEs do not."""
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def to_latents(vae, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Images in [-1, 1] -> scaled VAE latents (the posterior mean: deterministic, cacheable)."""
    vae = vae.to(device)
    out = [vae.encode(chunk.to(device, vae.dtype)).latent_dist.mode().float().cpu()
           for chunk in tqdm(images.split(batch_size), desc="latents", unit="batch", mininterval=1.0)]
    latents = torch.cat(out)
    shift = _shift(vae)
    return (latents - shift if shift else latents) * vae.config.scaling_factor


@torch.no_grad()
def to_images(vae, latents: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (the pipeline's decode, without its post-processing)."""
    vae = vae.to(device)
    shift = _shift(vae)
    out = [vae.decode((chunk / vae.config.scaling_factor + shift).to(device, vae.dtype)).sample.float().clamp(-1, 1).cpu()
           for chunk in latents.split(batch_size)]
    return torch.cat(out)
