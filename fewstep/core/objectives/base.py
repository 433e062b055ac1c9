"""What every objective is given (`Setup`), the shared helpers, and the small interface it implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.core.sampling import randn
from fewstep.core.training import edm_weighted_mse, frozen

Cond = Any  # what the denoisers condition on: class labels for digits, prompt embeddings for SD


@dataclass
class Setup:
    """Denoisers follow one contract: `d(x, sigma, cond) -> x0 estimate` with VE noise levels
    (x_noisy = x0 + sigma * eps), `d.guided(x, sigma, cond, scale)` for CFG, and `d.unet` (a diffusers UNet)."""
    teacher: nn.Module                             # real score, frozen
    student: nn.Module                             # the generator being trained
    fake: nn.Module                                # fake score (critic), trained online on student samples
    head: nn.Module                                # GAN discriminator head on the fake score's bottleneck
    tap: Any                                       # FeatureTap: the fake score's features the head reads
    real: Callable[[], tuple[torch.Tensor, Cond]]  # real (x0, cond) minibatches
    conditions: Callable[[int], Cond]              # n random conditions for generated samples
    noise_levels: Callable[[int], torch.Tensor]    # n noise levels for the DM / fake-score losses
    student_sigmas: list[float]                    # the student's conditioning noise levels, one per step
    params: Any                                    # the distill/finetune section (with the objective's subsection)
    generator: torch.Generator                     # every random draw of the objective comes from here
    device: torch.device
    sigma_data: float = 0.5
    trajectories: Callable[[], dict[str, torch.Tensor]] | None = None  # teacher ODE minibatches (dmd, consistency)
    simulator: Callable[[], nn.Module] | None = None  # runs the earlier steps in backward simulation; None = student
    # the fake score's condition for samples from student step k (an int, or one per sample; per-step critic);
    # None: one condition for all steps
    critic_cond: Callable[[Cond, int | torch.Tensor], Cond] | None = None
    # multi-step: split every batch evenly over the student's steps (class-label conditions only), instead of
    # training one random step per batch (DMD2)
    all_steps_per_batch: bool = False
    # draws that decide how many network calls a batch makes (the student step k): seeded alike on every rank
    # under torchrun, so the global batch has one k as in one process, and under FSDP every rank makes the
    # same calls (each gathers shards from all the others); None = `generator`
    step_generator: torch.Generator | None = None
    # n noise levels for the GAN head's own fake-score pass (dmd2.gan.t_min/t_max); None: the GAN head reads the
    # features of the DM (generator) or denoising (critic) pass, at their noise levels
    gan_noise_levels: Callable[[int], torch.Tensor] | None = None


@dataclass
class Generated:
    """A batch of student samples, their conditions and the student step(s) that made them (an int for the
    whole batch, or one per sample), which a per-step critic conditions on."""
    x: torch.Tensor
    cond: Cond
    step: int | torch.Tensor


class Objective:
    """One distillation method. The trainer runs `critic_loss` `critic_updates` times, then
    `generator_loss` once, per training step; each returns {"loss": total, ...parts to log}."""

    def __init__(self, setup: Setup):
        self.s = setup
        self.p = setup.params

    @property
    def critic_updates(self) -> int:
        return 1

    # --- shared helpers ---------------------------------------------------------------------------
    def randn(self, shape) -> torch.Tensor:
        return randn(shape, self.s.generator, self.s.device)

    def sample_shape(self, n: int) -> tuple[int, ...]:
        config = self.s.student.unet.config
        return (n, config.in_channels, config.sample_size, config.sample_size)

    def student_input(self, k: int) -> tuple[torch.Tensor, Cond]:
        """The noisy input the student sees at its k-th step, and its conditions, for a whole batch.

        Step 0 is pure noise. A later step needs an estimate to re-noise: with backward simulation it is
        the student's own output after steps 0..k-1 (what it will see at inference; `student_inputs`);
        without, a noised real image (DMD2's train/test mismatch baseline).
        """
        if k > 0 and not self.p.backward_simulation:
            x0, cond = self.s.real()
            return x0 + self.s.student_sigmas[k] * self.randn(x0.shape), cond
        return self.student_inputs(torch.full((self.p.batch_size,), k, device=self.s.device))

    def generate(self) -> Generated:
        """Student samples (with gradients when enabled) from a random one of its steps, or with
        `all_steps_per_batch` from every step at once."""
        sigmas = self.s.student_sigmas
        if self.s.all_steps_per_batch and len(sigmas) > 1:
            steps = torch.arange(self.p.batch_size, device=self.s.device) % len(sigmas)
            x, cond = self.student_inputs(steps)
            return Generated(self.s.student(x, torch.tensor(sigmas, device=self.s.device)[steps], cond), cond, steps)
        k = int(torch.randint(len(sigmas), (1,), generator=self.s.step_generator or self.s.generator))
        x, cond = self.student_input(k)
        return Generated(self.s.student(x, sigmas[k], cond), cond, k)

    def student_inputs(self, steps: torch.Tensor) -> tuple[torch.Tensor, Cond]:
        """Inputs for a batch whose sample i is at student step steps[i]. With backward simulation, step j runs
        (on `simulator`, e.g. the EMA weights that inference uses) on all samples still before their own step,
        so a batch over all steps costs what one random step does on average; without, samples past step 0
        are noised real images."""
        sigmas = torch.tensor(self.s.student_sigmas, device=self.s.device)
        cond = self.s.conditions(len(steps))
        x = self.randn(self.sample_shape(len(steps))) * sigmas[0]
        if not self.p.backward_simulation:
            real_x, real_cond = self.s.real()
            later = steps > 0
            noised = self.noised(real_x, sigmas[steps])
            return torch.where(later.view(-1, *[1] * (x.dim() - 1)), noised, x), torch.where(later, real_cond, cond)
        simulator = self.simulator()
        with torch.no_grad():
            for j in range(int(steps.max())):
                active = steps > j
                x0 = simulator(x[active], sigmas[j], cond[active])
                x[active] = x0 + sigmas[j + 1] * self.randn(x0.shape)
        return x, cond

    def simulator(self) -> nn.Module:
        """The weights that run a batch's earlier steps in backward simulation (`Setup.simulator`, or the student)."""
        return self.s.simulator() if self.s.simulator is not None else self.s.student

    def fake(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, step: int | torch.Tensor) -> torch.Tensor:
        """The fake score, for samples like those student step `step` makes: with a per-step critic it models
        the distribution of that step alone, not the mixture of all the steps' outputs."""
        if self.s.critic_cond is not None:
            cond = self.s.critic_cond(cond, step)
        return self.s.fake(x, sigma, cond)

    def trajectory_batch(self) -> dict[str, torch.Tensor]:
        """Teacher ODE minibatch: noise, cond, images, states (B, N+1, ...) and the N+1 sigmas."""
        if self.s.trajectories is None:
            raise ValueError(f"distill.objective {self.p.objective!r} needs the trajectories stage's outputs")
        return self.s.trajectories()

    def noised(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0 + sigma.view(-1, *[1] * (x0.dim() - 1)) * self.randn(x0.shape)

    def fake_score_loss(self, batch: Generated) -> torch.Tensor:
        """The fake score learns the student's current distribution: EDM-weighted denoising of a
        detached student batch (afterwards `tap.features` holds this forward's bottleneck)."""
        sigma = self.s.noise_levels(len(batch.x))
        pred = self.fake(self.noised(batch.x, sigma), sigma, batch.cond, batch.step)
        return edm_weighted_mse(pred, batch.x, sigma, self.s.sigma_data)

    def distribution_matching(self, batch: Generated, keep_graph_in_fake: bool = False) -> torch.Tensor:
        """DMD's KL gradient (x̂_fake − x̂_real) / mean|x − x̂_real| at a random noise level, applied to the
        student samples x through ½‖x − sg(x − grad)‖². With keep_graph_in_fake the fake forward keeps its
        graph (x → bottleneck) so a GAN head can reuse it; the fake score's weights never get gradients."""
        x, cond = batch.x, batch.cond
        sigma = self.s.noise_levels(len(x))
        noisy = self.noised(x.detach() if not keep_graph_in_fake else x, sigma)
        with frozen(self.s.fake, self.s.head):
            with torch.no_grad():
                pred_real = self.s.teacher.guided(noisy, sigma, cond, self.p.real_guidance)
            with torch.set_grad_enabled(keep_graph_in_fake):
                pred_fake = self.fake(noisy, sigma, cond, batch.step)
        weight = (x.detach() - pred_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-8)
        grad = (pred_fake.detach() - pred_real) / weight
        return 0.5 * F.mse_loss(x, (x - grad).detach())

    # --- the interface ----------------------------------------------------------------------------
    def generator_loss(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def critic_loss(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            batch = self.generate()
        denoise = self.fake_score_loss(batch)
        return {"denoise": denoise, "loss": denoise}

    def critic_modules(self) -> nn.Module:
        return self.s.fake
