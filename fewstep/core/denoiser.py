"""The denoiser contract every family's networks follow, so that the core never imports a family.

A denoiser maps a noisy sample at a VE noise level to its clean estimate, `d(x, sigma, cond) -> x0`, whatever
the network predicts underneath (EDM preconditioning, eps / v prediction, rectified-flow velocity);
`guided` adds classifier-free guidance, and `scheduler` is the EDMEulerScheduler whose Karras noise levels the
teacher's Heun solver walks.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class Denoiser(Protocol):
    scheduler: Any

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor: ...

    def guided(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any, guidance: float = 1.0) -> torch.Tensor: ...
