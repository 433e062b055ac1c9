"""DMD2's GAN discriminator: a small head on the fake score's features, and the hook that taps them."""
from __future__ import annotations

import torch
import torch.nn as nn

from fewstep.io import ConfiguredModule


class GanHead(ConfiguredModule):
    """DMD2's discriminator head: conv 4x4 stride 2 -> GroupNorm -> SiLU -> 1x1 conv logit, averaged."""

    file_stem = "gan_head"

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


class FeatureTap:
    """Keeps the latest output of one UNet block (the GAN head's input) via a forward hook: the mid-block
    (`bottleneck`, DMD2's choice) or the decoder's last block (`decoder`: full resolution, where a pixel-level
    artifact is not yet averaged away)."""

    def __init__(self, unet: nn.Module, where: str = "bottleneck"):
        self.features: torch.Tensor | None = None
        self.block(unet, where).register_forward_hook(self._keep)

    @staticmethod
    def block(unet: nn.Module, where: str) -> nn.Module:
        return unet.mid_block if where == "bottleneck" else unet.up_blocks[-1]

    @staticmethod
    def channels(unet: nn.Module, where: str) -> int:
        channels = unet.config.block_out_channels
        return channels[-1] if where == "bottleneck" else channels[0]

    def _keep(self, module, inputs, output):
        self.features = output
