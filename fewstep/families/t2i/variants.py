"""Text-to-image model families: what the shared SD stages need to know about a teacher's layout, in one table.

Every stage (encode, trajectories, critic, distill, finetune, evaluate, benchmark, export) asks the family of
`teacher.family` — never `if family == ...` — for its pipeline class, where the denoising network lives, which
denoiser puts it behind the VE contract every objective speaks (SDDenoiser: epsilon on a DDPM schedule;
FlowDenoiser: velocity of a rectified flow), the GAN head's features and the teacher's evaluation features.
Adding a family is one entry here and one `pipelines/<name>/params.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str                  # diffusers pipeline class (model_index.json's _class_name)
    network: str                   # subfolder of the denoising network: unet | transformer
    components: tuple[str, ...]    # subfolders a teacher directory must have
    pooled: bool = False           # encode_prompt returns a pooled embedding beside the hidden states
    time_ids: bool = False         # SDXL's size / crop micro-conditioning
    flow: bool = False             # rectified flow predicting velocity (else VP epsilon on a DDPM schedule)
    prompt_kwargs: tuple = ()      # encode_prompt's extra arguments (SD3 takes prompt_2 / prompt_3 positionally)
    pipeline_kwargs: tuple = ()    # from_pretrained arguments the pipeline needs (SD1.5: no safety checker)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def network_class(self):
        from diffusers import SD3Transformer2DModel, UNet2DConditionModel

        return SD3Transformer2DModel if self.flow else UNet2DConditionModel

    def denoiser(self, network: nn.Module, scheduler_config: dict, negative=None,
                 autocast_dtype: torch.dtype | None = None):
        """The network behind D(x; sigma, cond) -> x0 with VE noise levels."""
        from fewstep.families.t2i.sd_denoiser import SDDenoiser, alphas_cumprod
        from fewstep.families.t2i.flow_denoiser import FlowDenoiser

        if self.flow:
            return FlowDenoiser(network, scheduler_config, negative, autocast_dtype=autocast_dtype)
        return SDDenoiser(network, alphas_cumprod(scheduler_config), negative, autocast_dtype=autocast_dtype)

    def gan_tap(self, network: nn.Module, features: str = "bottleneck"):
        """The fake score's features the GAN head classifies: a UNet's bottleneck or decoder (FeatureTap), or
        the image tokens after a transformer's middle block laid out as a map."""
        from fewstep.core.heads import FeatureTap
        from fewstep.families.t2i.flow_denoiser import TokenTap

        return TokenTap(network) if self.flow else FeatureTap(network, features)

    def gan_channels(self, network: nn.Module, features: str = "bottleneck") -> int:
        from fewstep.core.heads import FeatureTap
        from fewstep.families.t2i.flow_denoiser import TokenTap

        return TokenTap.channels(network) if self.flow else FeatureTap.channels(network, features)

    def check_gan_features(self, features: str, key: str) -> None:
        """`features` (the params key `key`.features) is one this family's fake score has: a transformer has no
        decoder, so its GAN head reads the middle block's image tokens."""
        if self.flow and features != "bottleneck":
            from fewstep.params import ParamsError

            raise ParamsError(f"{key}.features: {features!r} needs a UNet; {self.name}'s transformer gives the GAN "
                              "head its middle block's image tokens (use 'bottleneck')")

    def feature_block(self, network: nn.Module) -> tuple[nn.Module, callable]:
        """The block whose output the teacher's evaluation features (FID-T) average, and how to average it."""
        from fewstep.families.t2i.flow_denoiser import TokenTap

        if self.flow:
            return TokenTap.middle_block(network), lambda out: TokenTap.image_tokens(out).float().mean(dim=1)
        return network.mid_block, lambda out: out.float().mean(dim=(2, 3))

    def check_latent_side(self, network_config: dict, side: int) -> str | None:
        """Why a latent side does not fit the network, or None: a transformer patchifies it."""
        patch = network_config.get("patch_size", 1) if self.flow else 1
        if side % patch:
            return f"the latent side {side} is not a multiple of the transformer's patch size {patch}"
        limit = network_config.get("pos_embed_max_size") if self.flow else None
        if limit and side // patch > limit:
            return f"{side // patch} patches a side exceed the transformer's pos_embed_max_size {limit}"
        return None


FAMILIES = {
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", "unet",
                   ("unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
                   pooled=True, time_ids=True),
    "sd15": Family("sd15", "StableDiffusionPipeline", "unet", ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
                   pipeline_kwargs=(("safety_checker", None), ("feature_extractor", None),
                                    ("requires_safety_checker", False))),
    # text_encoder_3 (T5) is optional in diffusers' SD3 pipeline: without it the T5 tokens are zeros
    "sd3": Family("sd3", "StableDiffusion3Pipeline", "transformer",
                  ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
                  pooled=True, flow=True, prompt_kwargs=(("prompt_2", None), ("prompt_3", None))),
}


def get(name: str) -> Family:
    return FAMILIES[name]


def of_teacher(teacher_path: Path) -> Family:
    """The family of a (validated) teacher directory, read from its model_index.json."""
    from fewstep.io import read_json

    found = read_json(Path(teacher_path) / "model_index.json").get("_class_name")
    return next(f for f in FAMILIES.values() if f.pipeline == found)


def of_network(network: nn.Module) -> Family:
    """A family whose network class this is (SDXL and SD1.5 share theirs): for code that holds only the network."""
    return next(f for f in FAMILIES.values() if isinstance(network, f.network_class()))

