"""Mini text-to-image teachers trained here on real data: the proof that a family *distills*, not only runs.

A mini teacher has its family's exact diffusers layout — pipeline class, network class, scheduler class and config
keys (SDXL: two CLIP encoders, pooled embeddings, `add_time_ids`, epsilon on the scaled-linear DDPM schedule;
SD1.5: one CLIP encoder, PNDM on the same schedule; SD3: CLIP x2 + T5, a rectified flow with the scheduler's
shift) — at a size a laptop trains in minutes: scikit-learn's digits upsampled, each captioned
`a handwritten digit k`, through a small AutoencoderKL trained on them first. Its text encoders are small, random
and frozen (the prompts still differ, in one token); the network learns to read them through cross-attention,
trained the way the family's teachers were (epsilon MSE at uniform DDPM timesteps; velocity MSE at logit-normal,
shifted flow times), with caption dropout to the pipeline's own negative branch so classifier-free guidance works.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

CAPTION = "a handwritten digit {}"
WORDS = ("a", "handwritten", "digit", *map(str, range(10)))


def caption(label: int) -> str:
    return CAPTION.format(label)


# --- tokenizers written here (nothing downloaded) -------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (every byte gets a visible stand-in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _word_merges(words) -> list[str]:
    """BPE merges that join each word's characters left to right into one token (`digit</w>`)."""
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
    return list(dict.fromkeys(merges))


def clip_tokenizer(folder: Path, words=WORDS, pad_token: str = "<|endoftext|>", max_length: int = 77,
                   merges: list[str] | None = None):
    """A CLIP BPE tokenizer saved to `folder`: every byte (and byte + </w>) is a token, so any prompt
    tokenizes; `words` are single tokens (or, given `merges`, exactly those merges apply)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    merges = _word_merges(words) if merges is None else merges
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    raw = folder.parent / f".{folder.name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (raw / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "pad_token": pad_token}))
    tokenizer = CLIPTokenizer.from_pretrained(raw)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def t5_tokenizer(words=WORDS):
    """A T5 (Unigram) tokenizer over whole words."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_text_config(width: int = 32, vocab_size: int = 1000, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=width, intermediate_size=2 * width,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                          vocab_size=vocab_size, hidden_act="gelu", **extra)


# --- the family's components at mini size -------------------------------------------------------------


def vae(channels: list[int], flow: bool = False):
    """An AutoencoderKL with 4 latent channels that downsamples by 2 ** (len(channels) - 1). SD3's VAE has no
    quant convs and centres its latents (shift_factor, set after training with the scaling factor)."""
    from diffusers import AutoencoderKL

    extra = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0} if flow else {}
    return AutoencoderKL(block_out_channels=list(channels), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * len(channels),
                         up_block_types=["UpDecoderBlock2D"] * len(channels), layers_per_block=1,
                         norm_num_groups=min(16, channels[0]), **extra)


def unet(width: int, depth: int, latent_side: int, text_width: int, sdxl: bool, pooled_width: int = 0):
    """A two-level UNet2DConditionModel, `depth` layers a block; SDXL's adds the pooled text embedding and six time ids."""
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 16,
                 "projection_class_embeddings_input_dim": 6 * 16 + pooled_width, "transformer_layers_per_block": 1}
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, block_out_channels=(width, 2 * width),
        layers_per_block=depth, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(width // 32 or 1, 2 * width // 32),
        norm_num_groups=32, cross_attention_dim=text_width, use_linear_projection=True, **extra)


def transformer(width: int, depth: int, latent_side: int, text_width: int, pooled_width: int):
    """An SD3Transformer2DModel: patch 2, `depth` joint blocks of `width` channels in heads of 32."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=latent_side, patch_size=2, in_channels=4, out_channels=4, num_layers=depth,
                                 attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=text_width,
                                 caption_projection_dim=width, pooled_projection_dim=pooled_width,
                                 pos_embed_max_size=latent_side // 2)


def scheduler(family: str):
    """The scheduler (class and config) the family's real teacher ships with."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
              "steps_offset": 1}
    if family == "sd15":
        return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    return EulerDiscreteScheduler(**common, timestep_spacing="leading", interpolation_type="linear",
                                  prediction_type="epsilon", use_karras_sigmas=False)


SD3_CLIP_TOKENS = 16  # BOS, `a handwritten digit k`, EOS and room to spare


def pipeline(family: str, autoencoder, width: int, depth: int, latent_side: int, seed: int, work: Path):
    """The family's diffusers pipeline with random text encoders and a random network, around a trained VAE."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from fewstep.families.t2i.variants import get

    torch.manual_seed(seed)
    text = 32
    tokenizer = lambda name, **kw: clip_tokenizer(work / name, **kw)
    if family == "sd15":
        parts = {"text_encoder": CLIPTextModel(clip_text_config(text)), "tokenizer": tokenizer("tokenizer"),
                 "unet": unet(width, depth, latent_side, text, sdxl=False), "safety_checker": None,
                 "feature_extractor": None, "requires_safety_checker": False}
    elif family == "sdxl":
        parts = {"text_encoder": CLIPTextModel(clip_text_config(text)),
                 "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(text, projection_dim=text)),
                 "tokenizer": tokenizer("tokenizer"), "tokenizer_2": tokenizer("tokenizer_2", pad_token="!"),
                 "unet": unet(width, depth, latent_side, 2 * text, sdxl=True, pooled_width=text)}
    else:  # sd3: CLIP-L and CLIP-G stand-ins with projections (pooled = both), T5 as wide as the joint attention
        # The MMDiT runs every text token through every block (a UNet only attends to them), so the mini's CLIP
        # context is SD3_CLIP_TOKENS positions, not 77: captions are 6 tokens, and 77 + 256 T5 tokens cost the
        # transformer a third more time here for nothing.
        tokenizer = lambda name, **kw: clip_tokenizer(work / name, max_length=SD3_CLIP_TOKENS, **kw)
        t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 4, d_model=2 * text, d_kv=16, d_ff=4 * text,
                                     num_layers=2, num_heads=4))
        parts = {"text_encoder": CLIPTextModelWithProjection(clip_text_config(text, projection_dim=text)),
                 "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(text, projection_dim=text)),
                 "text_encoder_3": t5, "tokenizer": tokenizer("tokenizer"),
                 "tokenizer_2": tokenizer("tokenizer_2", pad_token="!"), "tokenizer_3": t5_tokenizer(),
                 "transformer": transformer(width, depth, latent_side, 2 * text, 2 * text)}
    return getattr(diffusers, get(family).pipeline)(vae=autoencoder, scheduler=scheduler(family), **parts)


# --- training ------------------------------------------------------------------------------------------


def rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey images (N, 1, H, W) as the three channels every SD VAE takes."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def vae_loss(autoencoder, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> dict:
    """Reconstruction (L1 + MSE) of a posterior sample, plus a small KL to the prior (SD's VAE recipe, less the
    perceptual and GAN terms a digit does not need)."""
    posterior = autoencoder.encode(images).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = autoencoder.decode(z).sample
    l1, mse = F.l1_loss(recon, images), F.mse_loss(recon, images)
    kl = posterior.kl().mean() / images[0].numel()
    return {"loss": l1 + mse + kl_weight * kl, "l1": l1, "kl": kl}


@torch.no_grad()
def set_latent_scale(autoencoder, images: torch.Tensor, flow: bool) -> None:
    """scaling_factor (and SD3's shift_factor) so that the training latents have unit variance (zero mean for
    SD3), as SD's and SD3's VAE constants were chosen."""
    latents = torch.cat([autoencoder.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
    shift = float(latents.mean()) if flow else 0.0
    scale = 1.0 / float((latents - shift).std())
    autoencoder.register_to_config(scaling_factor=round(scale, 6))
    if flow:
        autoencoder.register_to_config(shift_factor=round(shift, 6))


def logit_normal_times(n: int, generator: torch.Generator, shift: float) -> torch.Tensor:
    """SD3's training times: u ~ logit-normal(0, 1), then the scheduler's shift."""
    from fewstep.families.t2i.flow_denoiser import shifted

    return shifted(torch.sigmoid(torch.randn(n, generator=generator)), shift)


def denoising_loss(network, family: str, latents: torch.Tensor, cond, noise_schedule: dict,
                   generator: torch.Generator) -> torch.Tensor:
    """One batch of the family's own training loss: epsilon MSE at a uniform DDPM timestep, or velocity MSE
    at a logit-normal, shifted flow time (the network sees t * 1000, as SD3's pipeline passes it)."""
    noise = torch.randn(latents.shape, generator=generator)
    if family == "sd3":
        t = logit_normal_times(len(latents), generator, noise_schedule["shift"]).view(-1, 1, 1, 1)
        noisy = (1 - t) * latents + t * noise
        pred = network(hidden_states=noisy, timestep=t.flatten() * 1000, encoder_hidden_states=cond.embeds,
                       pooled_projections=cond.pooled, return_dict=False)[0]
        return F.mse_loss(pred.float(), noise - latents)
    abar = noise_schedule["alphas_cumprod"]
    step = torch.randint(0, len(abar), (len(latents),), generator=generator)
    a = abar[step].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = network(noisy, step, **cond.unet_kwargs(torch.float32), return_dict=False)[0]
    return F.mse_loss(pred.float(), noise)


def upsample(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Real images in [-1, 1] at the mini teacher's side, in RGB (bilinear with antialiasing, as fewstep.data.sources
    resizes)."""
    x = images if images.shape[-1] == resolution else F.interpolate(
        images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return rgb(x.clamp(-1, 1)).contiguous()


def to_grey(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Generated RGB images in [-1, 1] as the grey images of the data's own side, where prepare's featurizer
    classifies (the inverse of `upsample`, up to the VAE's and the model's errors)."""
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-1] != resolution:
        grey = F.interpolate(grey, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return grey.clamp(-1, 1)
