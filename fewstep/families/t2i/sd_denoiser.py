"""A Stable Diffusion UNet behind fewstep's EDM/VE denoiser interface.

Every objective and sampler in fewstep speaks `denoiser(x, sigma, cond) -> x0` with x = x0 + sigma * eps
(variance exploding). SD UNets are trained variance preserving on a discrete DDPM schedule: x_t =
sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, predicting eps. The two meet through

    sigma_t = sqrt((1 - abar_t) / abar_t),   x_t = x / sqrt(sigma^2 + 1),   x0 = x - sigma * eps,

with the (fractional) timestep found by interpolating log sigma over the teacher's discrete schedule, as
k-diffusion does. So the generic code runs unchanged, and the student's conditioning timesteps
999/749/499/249 are simply the noise levels sigma_999 ... sigma_249.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DConditionModel


@dataclass
class SDCond:
    """A batch of cached text conditioning. SDXL fills `pooled` and `time_ids`, SD3 `pooled`; SD1.5 leaves them None."""

    embeds: torch.Tensor                 # (B, tokens, dim) encoder hidden states
    pooled: torch.Tensor | None = None   # (B, dim) pooled text embedding (SDXL, SD3)
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL size / crop conditioning

    def _map(self, fn) -> "SDCond":
        return SDCond(*(None if t is None else fn(t) for t in (self.embeds, self.pooled, self.time_ids)))

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, index) -> "SDCond":
        return self._map(lambda t: t[index])

    def to(self, device=None, dtype=None) -> "SDCond":
        # time ids are pixel sizes: they follow the device but keep their dtype until the UNet call
        return SDCond(self.embeds.to(device, dtype),
                      None if self.pooled is None else self.pooled.to(device, dtype),
                      None if self.time_ids is None else self.time_ids.to(device))

    def expand(self, n: int) -> "SDCond":
        """Repeat a one-item batch n times (the negative prompt for a whole batch)."""
        assert len(self) == 1, f"expand needs a one-item batch, got {len(self)}"
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(conds: list["SDCond"]) -> "SDCond":
        parts = [[getattr(c, f.name) for c in conds] for f in fields(SDCond)]
        return SDCond(*(None if p[0] is None else torch.cat(p) for p in parts))

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}
        return kwargs


def alphas_cumprod(scheduler_config) -> torch.Tensor:
    """The teacher's training schedule abar_t, t = 0..T-1, read through diffusers (any beta schedule)."""
    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()


def ve_sigmas(abar: torch.Tensor) -> torch.Tensor:
    return ((1 - abar) / abar).sqrt()


class SDDenoiser(nn.Module):
    """D(x; sigma, cond) over a UNet2DConditionModel, with classifier-free guidance against a cached
    negative-prompt embedding. `scheduler` is an EDMEulerScheduler spanning the teacher's noise range, so
    fewstep's Karras-grid samplers (sampling.heun_sample) work on it directly."""

    def __init__(self, unet: UNet2DConditionModel, abar: torch.Tensor, negative: SDCond | None = None,
                 sigma_data: float = 1.0, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.unet, self.negative, self.autocast_dtype = unet, negative, autocast_dtype
        self._use_sigmas(ve_sigmas(abar), sigma_data)

    def _use_sigmas(self, sigmas: torch.Tensor, sigma_data: float) -> None:
        """The VE sigma of each training timestep (float64, so that the student's integer timesteps map back to
        themselves exactly) and an EDMEulerScheduler spanning them, for the Karras-grid samplers."""
        self.log_sigmas = sigmas.log()
        sigmas = self.log_sigmas.exp()  # the scheduler's range as the table holds it
        self.scheduler = EDMEulerScheduler(sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]),
                                           sigma_data=sigma_data, rho=7.0)

    def sigma_of(self, timestep: int | float) -> float:
        """The VE noise level of a (possibly fractional) DDPM timestep."""
        t = torch.as_tensor(float(timestep), dtype=torch.float64)
        lo = t.floor().long().clamp(0, len(self.log_sigmas) - 1)
        hi = (lo + 1).clamp(max=len(self.log_sigmas) - 1)
        w = t - lo
        return float(((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep of each noise level: linear interpolation in log sigma."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().log().clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo_value, hi_value = log_sigmas[hi - 1], log_sigmas[hi]
        t = hi - 1 + (log_sigma - lo_value) / (hi_value - lo_value)
        # a float32 sigma of an integer timestep lands within ~1e-4 of it: snap, so the student sees the
        # very timesteps its exported diffusers scheduler will feed it
        return torch.where((t - t.round()).abs() < 1e-3, t.round(), t).float()

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None or device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(self, x: torch.Tensor, sigma, cond: SDCond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.view(-1, 1, 1, 1)
        dtype = self.unet.dtype
        with self._autocast(x.device):
            eps = self.unet((x / (s**2 + 1).sqrt()).to(dtype), self.timestep(sigma),
                            **cond.to(x.device).unet_kwargs(dtype)).sample
        return x - s * eps.to(x.dtype)

    def guided(self, x: torch.Tensor, sigma, cond: SDCond, guidance: float = 1.0) -> torch.Tensor:
        """Classifier-free guidance: uncond + guidance * (cond - uncond), one batched UNet call."""
        if guidance == 1.0:
            return self(x, sigma, cond)
        assert self.negative is not None, "guidance != 1 needs the cached negative-prompt embedding"
        negative = self.negative.to(x.device).expand(len(x))
        negative.time_ids = cond.time_ids  # SDXL: the unconditional branch keeps the sample's size / crop ids
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        pos, neg = self(torch.cat([x, x]), torch.cat([sigma, sigma]), SDCond.cat([cond, negative])).chunk(2)
        return neg + guidance * (pos - neg)
