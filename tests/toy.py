"""A 2-D Gaussian-mixture world for objective tests: an analytic teacher score, small MLP denoisers
that follow objectives.Setup's denoiser contract (points are (n, 2, 1, 1) "images")."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from fewstep.core.objectives import Setup
from fewstep.params import DistillParams
from fewstep.families.edm.unet import karras_grid_sigmas

EDM = SimpleNamespace(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0, rho=7.0)
MEANS = torch.tensor([[-2.0, 1.0], [2.0, -1.0], [0.0, 2.5]])
STD = 0.3  # per-component standard deviation


def target_moments() -> tuple[torch.Tensor, torch.Tensor]:
    mean = MEANS.mean(0)
    centered = MEANS - mean
    return mean, STD**2 * torch.eye(2) + centered.T @ centered / len(MEANS)


def sample_target(n: int, generator: torch.Generator) -> torch.Tensor:
    which = torch.randint(len(MEANS), (n,), generator=generator)
    return (MEANS[which] + STD * torch.randn(n, 2, generator=generator)).view(n, 2, 1, 1)


def moment_error(points: torch.Tensor) -> float:
    mean, cov = target_moments()
    x = points.view(-1, 2)
    return float((x.mean(0) - mean).norm() + (torch.cov(x.T) - cov).norm())


class GMMTeacher(nn.Module):
    """Exact E[x0 | x0 + sigma*eps] for the equal-weight mixture above (differentiable in x)."""

    unet = SimpleNamespace(config=SimpleNamespace(in_channels=2, sample_size=1))

    def forward(self, x, sigma, cond=None):
        n = x.shape[0]
        points = x.view(n, 2)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(n)[:, None]
        var = STD**2 + sigma**2  # (n, 1)
        sq = ((points[:, None, :] - MEANS[None]) ** 2).sum(-1)  # (n, K)
        resp = torch.softmax(-sq / (2 * var), dim=1)
        posterior = MEANS[None] + (STD**2 / var)[:, :, None] * (points[:, None, :] - MEANS[None])
        return (resp[:, :, None] * posterior).sum(1).view_as(x)

    def guided(self, x, sigma, cond=None, scale=1.0):
        return self(x, sigma, cond)


class MLPDenoiser(nn.Module):
    """EDM-preconditioned MLP: x0 = c_skip x + c_out F(c_in x, log sigma / 4)."""

    def __init__(self, hidden: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        self.unet = SimpleNamespace(config=SimpleNamespace(in_channels=2, sample_size=1))

    def forward(self, x, sigma, cond=None):
        n, d = x.shape[0], EDM.sigma_data
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(n)[:, None]
        points = x.view(n, 2)
        c_in, c_skip = 1 / (sigma**2 + d**2).sqrt(), d**2 / (sigma**2 + d**2)
        c_out = sigma * d / (sigma**2 + d**2).sqrt()
        out = self.net(torch.cat([c_in * points, sigma.log() / 4], dim=1))
        return (c_skip * points + c_out * out).view_as(x)

    def guided(self, x, sigma, cond=None, scale=1.0):
        return self(x, sigma, cond)


class NoTap:
    features = None


def ode_pairs(teacher: nn.Module, n: int, generator: torch.Generator, steps: int = 40) -> dict[str, torch.Tensor]:
    """Euler solves of the teacher's probability-flow ODE: noise -> image, with every state kept."""
    u = torch.linspace(0, 1, steps)
    hi, lo = EDM.sigma_max ** (1 / EDM.rho), EDM.sigma_min ** (1 / EDM.rho)
    sigmas = torch.cat([(hi + u * (lo - hi)) ** EDM.rho, torch.zeros(1)])
    noise = torch.randn(n, 2, 1, 1, generator=generator)
    x, states = noise * sigmas[0], []
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            states.append(x)
            x = x + (s_next - s) * (x - teacher(x, s)) / s
    states.append(x)
    return {"noise": noise, "images": x, "states": torch.stack(states, 1), "sigmas": sigmas}


def toy_setup(objective: str, seed: int = 0, **params) -> Setup:
    generator = torch.Generator().manual_seed(seed)
    settings = {"objective": objective, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.0, "checkpoint_every": 0,
                "log_every": 50, "dmd2": {"ttur": 5, "gan": {"generator_weight": 0.0, "critic_weight": 0.0}},
                "sid": {"ttur": 5}}  # data-free toy: no GAN head
    p = DistillParams.model_validate({**settings, **params})
    teacher = GMMTeacher()
    pairs = ode_pairs(teacher, 2048, torch.Generator().manual_seed(seed + 1))

    def trajectory_batch():
        idx = torch.randint(len(pairs["noise"]), (p.batch_size,), generator=generator)
        return {"noise": pairs["noise"][idx], "images": pairs["images"][idx], "states": pairs["states"][idx],
                "sigmas": pairs["sigmas"], "cond": None}

    return Setup(
        teacher=teacher, student=MLPDenoiser(seed=seed + 2), fake=MLPDenoiser(seed=seed + 3), head=nn.Identity(),
        tap=NoTap(), real=lambda: (sample_target(p.batch_size, generator), None), conditions=lambda n: None,
        noise_levels=lambda n: karras_grid_sigmas(n, EDM, p.t_min, p.t_max, generator),
        student_sigmas=[EDM.sigma_max], params=p, generator=generator, device=torch.device("cpu"),
        sigma_data=EDM.sigma_data, trajectories=trajectory_batch)


@torch.no_grad()
def student_points(setup: Setup, n: int = 4000) -> torch.Tensor:
    noise = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(123))
    return setup.student(noise * setup.student_sigmas[0], setup.student_sigmas[0], None)
