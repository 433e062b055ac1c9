"""The flow-matching (SD3-class) denoiser on a tiny random SD3Transformer2DModel: velocity -> x0 in VE coordinates
agrees with diffusers' own FlowMatchEulerDiscreteScheduler, so every objective can run on it unchanged."""
import pytest
import torch

from fewstep.families.t2i.sd_denoiser import SDCond


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=8).eval()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_flow_x0_makes_the_schedulers_euler_steps(shift):
    """Each step of FlowMatchEulerDiscreteScheduler (the SD3 pipeline's sampler) equals a DDIM step in VE coordinates
    from fewstep's x0 = x_t - t v: keep x0 and the implied noise, move to the next noise level."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.families.t2i.flow_denoiser import FlowDenoiser

    transformer = tiny_sd3_transformer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    model = FlowDenoiser(transformer, dict(scheduler.config))
    scheduler.set_timesteps(6)
    generator = torch.Generator().manual_seed(0)
    cond = SDCond(torch.randn(2, 5, 16, generator=generator), torch.randn(2, 12, generator=generator))
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    steps = 0
    for i, timestep in enumerate(scheduler.timesteps):
        t, t_next = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
        with torch.no_grad():
            v = transformer(x_t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                            timestep=timestep.expand(2)).sample
            theirs = scheduler.step(v, timestep, x_t).prev_sample
            if t < 1:  # t = 1 (pure noise) has no VE coordinate: the first step is the scheduler's alone
                sigma, sigma_next = float(t / (1 - t)), float(t_next / (1 - t_next))
                x = x_t / (1 - float(t))
                x0 = model(x, sigma, cond)
                ours = (x0 + sigma_next / sigma * (x - x0)) * (1 - float(t_next))
                torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
                steps += 1
        x_t = theirs
    assert steps == 5


def test_sd3_flow_noise_levels_follow_the_shifted_training_timesteps():
    """sigma_of(i) is the VE sigma of the scheduler's training sigma t_i (shifted), capped below t = 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.families.t2i.flow_denoiser import T_MAX, FlowDenoiser

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = FlowDenoiser(tiny_sd3_transformer(), dict(scheduler.config))
    train_t = scheduler.sigmas.flip(0).double()  # t of training timesteps 0..999, increasing (stored in fp32)
    for i in (0, 20, 499, 980):
        t = float(train_t[i])
        assert model.sigma_of(i) == pytest.approx(t / (1 - t), rel=2e-5)  # 1 / (1 - t) magnifies fp32's rounding
    assert model.sigma_of(999) == pytest.approx(T_MAX / (1 - T_MAX), rel=1e-6)


def test_sd3_token_tap_feeds_the_gan_head():
    from fewstep.core.heads import GanHead
    from fewstep.families.t2i.flow_denoiser import FlowDenoiser, TokenTap

    transformer = tiny_sd3_transformer()
    model = FlowDenoiser(transformer, {"shift": 3.0})
    tap = TokenTap(transformer)
    head = GanHead(TokenTap.channels(transformer), width=8)
    cond = SDCond(torch.randn(3, 5, 16), torch.randn(3, 12))
    model(torch.randn(3, 4, 8, 8), 2.0, cond)
    assert tap.features.shape == (3, 16, 4, 4)
    assert head(tap.features).shape == (3,)


def test_sd3_exported_pipeline_replays_the_student(tmp_path):
    """The exported StableDiffusion3Pipeline's step is the student's: from the same noise and conditioning, one
    step gives the student's x0 (up to the 1e-4 between t = 1 and fewstep's T_MAX), and 4 steps use the student's
    shifted t_i with fresh noise in between (FlowMatchEuler's stochastic sampling)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import sd_fixtures as sd
    from diffusers import StableDiffusion3Pipeline

    from fewstep.io import read_json
    from fewstep.families.t2i import export, networks as models, teacher

    path = sd.tiny_sd3(tmp_path / "tiny-sd3")
    student = models.denoiser(teacher.load_network(path, "sd3"), path, None, "cpu")
    for timesteps in ([999], [999, 749, 499, 249]):
        out = tmp_path / f"export-{len(timesteps)}"
        export.export(path, "sd3", student.unet, timesteps, out)
        call = read_json(out / "fewstep.json")
        pipe = StableDiffusion3Pipeline.from_pretrained(out)
        generator = torch.Generator().manual_seed(0)
        embeds, pooled = torch.randn(2, 20, 64, generator=generator), torch.randn(2, 64, generator=generator)
        noise = torch.randn(2, 4, 8, 8, generator=generator)
        latents = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=noise, output_type="latent",
                       num_inference_steps=call["num_inference_steps"], sigmas=call["sigmas"],
                       guidance_scale=call["guidance_scale"]).images
        expected_t = [float(student.flow_time(torch.tensor(student.sigma_of(i), dtype=torch.float64))) for i in timesteps]
        assert (pipe.scheduler.timesteps / 1000).tolist() == pytest.approx(expected_t, abs=1.5e-4)
        if len(timesteps) == 1:
            sigma = student.sigma_of(999)
            with torch.no_grad():
                x0 = student(noise * sigma, sigma, SDCond(embeds, pooled))
            torch.testing.assert_close(latents, x0, atol=5e-3, rtol=5e-3)
        assert torch.isfinite(latents).all()
        again = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=noise, output_type="latent",
                     num_inference_steps=call["num_inference_steps"], sigmas=call["sigmas"],
                     guidance_scale=call["guidance_scale"], generator=torch.Generator().manual_seed(7)).images
        # the same start: one step is deterministic; four draw fresh noise between the steps (from the generator)
        assert pipe.scheduler.config.stochastic_sampling  # the last step lands on t = 0, where noise weighs 0
        assert torch.equal(again, latents) == (len(timesteps) == 1)


def test_sd3_a_resolution_dependent_shift_is_refused_in_one_line():
    from fewstep.io import ArtifactError
    from fewstep.families.t2i.flow_denoiser import flow_sigmas

    with pytest.raises(ArtifactError, match=r"^scheduler/scheduler_config.json: use_dynamic_shifting is true"):
        flow_sigmas({"shift": 3.0, "use_dynamic_shifting": True})
