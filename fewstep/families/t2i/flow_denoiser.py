"""Rectified-flow (SD3-class) teachers in the denoiser contract every objective uses: D(x; sigma, cond) -> x0 with
VE noise levels (x = x0 + sigma * eps).

A flow model sees x_t = (1 - t) x0 + t eps and predicts the velocity v = eps - x0 (diffusers'
SD3Transformer2DModel with FlowMatchEulerDiscreteScheduler). The same point in VE coordinates is
x = x_t / (1 - t) at sigma = t / (1 - t), and x0 = x_t - t v. Euler steps of the flow ODE are then exactly DDIM
steps in VE coordinates (both keep x0 and eps of the step fixed), which is what tests/test_sd3.py checks against
the scheduler's own `step`. t = 1 (pure noise) has no VE coordinate: the schedule ends at t = 1 - 1e-4
(sigma = 1e4), where x / (1 + sigma) is the noise to fp32 precision.

Training timestep i (0..999) is the scheduler's t_i = shift((i + 1) / 1000) — the table `log_sigmas` holds their VE
sigmas — so `sigma_of`, DMD2's t ~ U[t_min, t_max] and the student's timesteps read as in the SD pipelines.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fewstep.families.t2i.sd_denoiser import SDCond, SDDenoiser

T_MAX = 1 - 1e-4  # where the noise end of the flow is taken (VE sigma 1e4)


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (diffusers' FlowMatchEulerDiscreteScheduler, static shifting)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(scheduler_config: dict) -> torch.Tensor:
    """VE sigmas of the training timesteps 0..T-1, float64, increasing."""
    if scheduler_config.get("use_dynamic_shifting"):
        from fewstep.io import ArtifactError

        # the shift then depends on the image's token count (mu), which a fixed noise table cannot hold
        raise ArtifactError("scheduler/scheduler_config.json: use_dynamic_shifting is true (a resolution-dependent "
                            "shift, as Flux uses); fewstep's flow family supports a static `shift` (SD3, SD3.5)")
    steps = scheduler_config.get("num_train_timesteps", 1000)
    t = shifted(torch.arange(1, steps + 1, dtype=torch.float64) / steps, scheduler_config.get("shift", 1.0))
    t = t.clamp(max=T_MAX)
    return t / (1 - t)


class FlowDenoiser(SDDenoiser):
    """D(x; sigma, cond) over an SD3Transformer2DModel. The network sits in `.unet`, the attribute name every
    denoiser of the shared contract uses (FSDP, the objectives and the samplers find it there). `sigma_of` and
    `timestep` map training-timestep indices to VE sigmas and back as for SD; the transformer itself is fed
    1000 t, as diffusers' SD3 pipeline feeds it. Guidance (`guided`) is SD's batched CFG."""

    def __init__(self, transformer: nn.Module, scheduler_config: dict, negative: SDCond | None = None,
                 autocast_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.unet, self.negative, self.autocast_dtype = transformer, negative, autocast_dtype
        self._use_sigmas(flow_sigmas(scheduler_config), sigma_data=1.0)

    def flow_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """t of each VE noise level: t = sigma / (1 + sigma)."""
        return sigma / (1 + sigma)

    def forward(self, x: torch.Tensor, sigma, cond: SDCond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        t = self.flow_time(sigma).view(-1, 1, 1, 1)
        x_t = x * (1 - t)
        dtype = self.unet.dtype
        cond = cond.to(x.device)
        with self._autocast(x.device):
            v = self.unet(x_t.to(dtype), timestep=(1000 * t.flatten()).to(dtype),
                          encoder_hidden_states=cond.embeds.to(dtype),
                          pooled_projections=cond.pooled.to(dtype)).sample
        return x_t - t * v.to(x.dtype)


class TokenTap:
    """The fake score's features for the GAN head on a transformer: the image tokens after its middle block,
    laid out as a (B, C, h, w) map like a UNet's mid-block output."""

    def __init__(self, transformer: nn.Module):
        self.features: torch.Tensor | None = None
        self.middle_block(transformer).register_forward_hook(self._keep)

    @staticmethod
    def middle_block(transformer: nn.Module) -> nn.Module:
        blocks = transformer.transformer_blocks
        return blocks[len(blocks) // 2]

    @staticmethod
    def image_tokens(output) -> torch.Tensor:
        """A block's image tokens (B, n, C): SD3's joint blocks return (text, image) tokens."""
        return output[1] if isinstance(output, tuple) else output

    def _keep(self, module, inputs, output):
        tokens = self.image_tokens(output)
        b, n, c = tokens.shape
        side = math.isqrt(n)  # square latents: the tokens are a side x side grid of patches
        self.features = tokens.transpose(1, 2).reshape(b, c, side, n // side)

    @staticmethod
    def channels(transformer: nn.Module) -> int:
        config = transformer.config
        return config.num_attention_heads * config.attention_head_dim
