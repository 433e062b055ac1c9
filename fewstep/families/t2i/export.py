"""The deliverable: a diffusers pipeline directory with the student UNet and a scheduler that replays the
student's own sampling, so `StableDiffusionXLPipeline.from_pretrained(out)(prompt, num_inference_steps=N,
guidance_scale=0)` generates as fewstep trained it.

- N > 1 steps (e.g. 999/749/499/249): LCMScheduler predicts x0 at each timestep and re-noises it with
  fresh noise to the next one — exactly fewstep's `student_sample` — when its timestep schedule for N
  steps (`original_inference_steps`) is the student's. Its first input is unit noise where fewstep's is
  noise * sigma_999 / sqrt(sigma_999^2 + 1) = 0.9977 * noise: SD's schedule has no zero terminal SNR.
- N = 1 (e.g. DMD2's t = 399 one-step SDXL): EulerDiscreteScheduler with a one-point Karras schedule at
  sigma_t and "trailing" spacing starts from noise * sigma_t and steps straight to x0 — exact.
- Flow families (SD3): FlowMatchEulerDiscreteScheduler with `stochastic_sampling` — x0 = x_t - t v, then fresh
  noise to the next t — at the student's own t, passed as the pipeline's `sigmas` (unshifted (i + 1) / 1000; the
  scheduler applies the teacher's shift, giving the training t_i). The first input is pure noise at t = 1 where
  fewstep's is at t = 1 - 1e-4 (fewstep.families.t2i.flow_denoiser.T_MAX): a 1e-4 difference in the first input's scale.
"""
from __future__ import annotations

from pathlib import Path

from fewstep.io import write_json
from fewstep.params import ParamsError
from fewstep.families.t2i import variants, teacher as teachers
from fewstep.families.t2i.sd_denoiser import alphas_cumprod, ve_sigmas


def _accepted(cls, config: dict) -> dict:
    """The teacher's scheduler config, less the keys `cls` does not take (diffusers warns on each)."""
    import inspect

    return {k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters}


def _lcm(config: dict, timesteps: list[int]):
    from diffusers import LCMScheduler

    config = _accepted(LCMScheduler, config)
    for original_steps in range(len(timesteps), config.get("num_train_timesteps", 1000) + 1):
        # timestep_scaling makes LCM's boundary-condition blend c_skip * x_t vanish (the student predicts x0)
        scheduler = LCMScheduler.from_config(config, original_inference_steps=original_steps, timestep_scaling=1e4,
                                             prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)
        scheduler.set_timesteps(len(timesteps))
        if scheduler.timesteps.tolist() == list(timesteps):
            return scheduler
    return None


def _one_step_euler(config: dict, timestep: int):
    from diffusers import EulerDiscreteScheduler

    sigma = float(ve_sigmas(alphas_cumprod(config))[timestep])
    scheduler = EulerDiscreteScheduler.from_config(
        _accepted(EulerDiscreteScheduler, config), use_karras_sigmas=True, sigma_max=sigma, sigma_min=sigma, timestep_spacing="trailing",
        final_sigmas_type="zero", prediction_type="epsilon", timestep_type="discrete")
    scheduler.set_timesteps(1)
    return scheduler if round(float(scheduler.timesteps[0])) == timestep else None


def student_scheduler(teacher_scheduler_config: dict, timesteps: list[int]):
    """A diffusers scheduler whose `set_timesteps(len(timesteps))` yields the student's timesteps.
    Raises ParamsError (naming distill.student_timesteps) when no stock scheduler can replay them."""
    config = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    scheduler = _one_step_euler(config, timesteps[0]) if len(timesteps) == 1 else _lcm(config, timesteps)
    if scheduler is None:
        raise ParamsError(f"distill.student_timesteps {timesteps} cannot be replayed by a diffusers scheduler with "
                          f"num_inference_steps={len(timesteps)}; use evenly spaced steps ending at 999, e.g. "
                          f"[999, 749, 499, 249]")
    return scheduler


def flow_student_scheduler(teacher_scheduler_config: dict, timesteps: list[int]):
    """The flow student's sampler and the `sigmas` the pipeline passes it: x0, then fresh noise to the next t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_accepted(FlowMatchEulerDiscreteScheduler, config),
                                                            stochastic_sampling=True)
    steps = scheduler.config.num_train_timesteps
    return scheduler, [(t + 1) / steps for t in timesteps]


def export(teacher_path: Path, family: str, student_network, timesteps: list[int], out: Path) -> None:
    """Write the teacher's pipeline with the student network and the student's scheduler to `out`."""
    f = variants.get(family)
    call = {"num_inference_steps": len(timesteps), "guidance_scale": 0.0}
    if f.flow:
        scheduler, call["sigmas"] = flow_student_scheduler(teachers.scheduler_config(teacher_path), timesteps)
    else:
        scheduler = student_scheduler(teachers.scheduler_config(teacher_path), timesteps)
    pipe = f.pipeline_class().from_pretrained(teacher_path, **{f.network: student_network}, scheduler=scheduler,
                                              **teachers.pipeline_kwargs(teacher_path, family))
    pipe.save_pretrained(out)
    arguments = ", ".join(f"{k}={v!r}" for k, v in call.items())
    write_json({"student_timesteps": list(timesteps), **call, "teacher": str(teacher_path),
                "usage": f"{type(pipe).__name__}.from_pretrained(dir)(prompt, {arguments})"}, out / "fewstep.json")
