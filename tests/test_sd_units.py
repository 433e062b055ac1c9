"""SD building blocks on tiny random-weight models: the VE denoiser, the exported schedulers, teacher and
prompt checks, params, LoRA students, and the encode cache's promise (no text encoder / VAE encoder later)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sd_fixtures as sd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sd-teachers")
    return {"sdxl": sd.tiny_sdxl(root / "tiny-sdxl"), "sd15": sd.tiny_sd15(root / "tiny-sd15"), "root": root}


def _denoiser(path, negative=None):
    from fewstep.families.t2i import networks as models, teacher

    return models.denoiser(teacher.load_network(path, "sdxl"), path, negative, "cpu")


def _cond(path, prompts, family="sdxl"):
    from fewstep.families.t2i import encode, teacher

    pipe = teacher.load_text_pipeline(path, family)
    cond = encode.encode_texts(pipe, prompts, family, 8, torch.device("cpu"))
    if family == "sdxl":
        cond.time_ids = torch.tensor([encode.sdxl_time_ids(16)]).expand(len(prompts), -1)
    return cond, encode.encode_negative(pipe, "", family, torch.device("cpu"))


def test_denoiser_is_the_vp_model_in_ve_coordinates(teachers):
    """x0 from D(x; sigma) equals the DDPM formula (x_t - sqrt(1 - abar) eps) / sqrt(abar) at x_t = x / sqrt(sigma^2 + 1)."""
    from fewstep.families.t2i.sd_denoiser import alphas_cumprod

    path = teachers["sdxl"]
    model = _denoiser(path)
    cond, _ = _cond(path, ["a red square", "two dots"])
    abar = alphas_cumprod(sd.teacher_scheduler_config(path)).float()
    x0 = torch.randn(2, 4, 8, 8)
    for t in (999, 500, 20):
        sigma = model.sigma_of(t)
        assert model.timestep(torch.tensor([sigma])).item() == t  # integer timesteps map back exactly
        x_t = torch.sqrt(abar[t]) * x0 + torch.sqrt(1 - abar[t]) * torch.randn_like(x0)
        with torch.no_grad():
            eps = model.unet(x_t, torch.tensor([t, t]), **cond.unet_kwargs(torch.float32)).sample
            ours = model(x_t * (sigma**2 + 1) ** 0.5, sigma, cond)
        ddpm = (x_t - torch.sqrt(1 - abar[t]) * eps) / torch.sqrt(abar[t])
        torch.testing.assert_close(ours, ddpm, atol=1e-4, rtol=1e-4)


def test_guidance_is_one_batched_cfg_against_the_cached_negative(teachers):
    path = teachers["sdxl"]
    cond, negative = _cond(path, ["a red square"])
    model = _denoiser(path, negative)
    x, sigma = torch.randn(1, 4, 8, 8), model.sigma_of(600)
    with torch.no_grad():
        pos, neg = model(x, sigma, cond), model(x, sigma, sd.with_time_ids(negative, cond))
        torch.testing.assert_close(model.guided(x, sigma, cond, 1.0), pos)
        batches = []
        hook = model.unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(len(args[0])),
                                                    with_kwargs=True)
        try:
            guided = model.guided(x, sigma, cond, 8.0)
        finally:
            hook.remove()
        torch.testing.assert_close(guided, neg + 8.0 * (pos - neg), atol=1e-4, rtol=1e-4)
    assert batches == [2 * len(x)]  # one UNet call on [negative, positive], not two


def test_teacher_features_fid_t_floor_and_student_pairing(teachers):
    """FID-T with nothing but the teacher: its UNet's pooled mid-block features, fixed per image; the teacher's
    own other-noise half is the floor and every model is scored on the same halves."""
    from fewstep.families.t2i import t2i_evaluation as evaluate

    path = teachers["sdxl"]
    teacher = _denoiser(path)
    cond, _ = _cond(path, ["a red square", "a blue circle", "a green dot"])
    rounds, prompts = 4, 3
    cond = cond[torch.arange(rounds * prompts) % prompts]
    latents = torch.randn(rounds * prompts, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    feats = evaluate.teacher_features(teacher, latents, cond, 5, torch.device("cpu"), seed=0)
    assert feats.shape == (12, teacher.unet.config.block_out_channels[-1])
    assert torch.equal(feats, evaluate.teacher_features(teacher, latents, cond, 5, torch.device("cpu"), seed=0))
    assert torch.allclose(feats, evaluate.teacher_features(teacher, latents, cond, 4, torch.device("cpu"), seed=0),
                          atol=1e-5)  # batching changes only float rounding
    first, second = evaluate.halves(12, rounds)
    assert first.tolist() == list(range(6)) and second.tolist() == list(range(6, 12))
    images = {"teacher": torch.rand(12, 3, 4, 4) * 2 - 1}
    images["student"] = images["teacher"].clone()
    same = evaluate.fidelity({"teacher": feats, "student": feats.clone()}, images, rounds)
    assert same["student"] == same["teacher"]  # a student identical to the teacher scores the floor exactly
    far = evaluate.fidelity({"teacher": feats, "student": feats + 5 * feats.std()}, images, rounds)
    assert far["student"]["fid_t"] > same["teacher"]["fid_t"] + 1
    assert far["teacher"] == same["teacher"] and far["teacher"]["fid_t"] > 0  # the floor: other noise, same prompts
    twin = evaluate.fidelity({"teacher": torch.cat([feats[first], feats[first]]), "student": feats}, images, rounds)
    assert twin["teacher"]["fid_t"] == pytest.approx(0, abs=1e-3)  # its halves alike: no floor left


def test_student_schedulers_replay_the_student_timesteps(teachers):
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    from fewstep.params import ParamsError
    from fewstep.families.t2i.export import student_scheduler

    config = sd.teacher_scheduler_config(teachers["sdxl"])
    four = student_scheduler(config, [999, 749, 499, 249])
    assert isinstance(four, LCMScheduler) and four.timesteps.tolist() == [999, 749, 499, 249]
    one = student_scheduler(config, [399])  # DMD2's one-step SDXL conditioning
    assert isinstance(one, EulerDiscreteScheduler) and one.timesteps.tolist() == [399.0]
    with pytest.raises(ParamsError, match=r"distill.student_timesteps \[999, 500\] cannot be replayed"):
        student_scheduler(config, [999, 500])


def test_exported_one_step_pipeline_replays_the_student_exactly(teachers, tmp_path):
    """Same noise, same prompt: StableDiffusionXLPipeline(num_inference_steps=1) == fewstep's student_sample."""
    from diffusers import StableDiffusionXLPipeline

    from fewstep.core.sampling import student_sample
    from fewstep.families.t2i import export, teacher

    path = teachers["sdxl"]
    export.export(path, "sdxl", teacher.load_network(path, "sdxl"), [399], tmp_path / "out")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    model = _denoiser(path)
    cond, _ = _cond(path, ["a red square"])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = student_sample(model, noise, cond, [model.sigma_of(399)])
    theirs = pipe("a red square", num_inference_steps=1, guidance_scale=0.0, latents=noise.clone(),
                  output_type="latent").images
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_teacher_and_prompt_errors_are_one_clear_line(teachers, tmp_path):
    from fewstep.data.sources import DataError
    from fewstep.io import ArtifactError
    from fewstep.families.t2i import prompts, teacher

    with pytest.raises(ArtifactError, match=r"teacher.path: .*nowhere does not exist \(expected a local diffusers SDXL"):
        teacher.resolve(str(tmp_path / "nowhere"), "sdxl")
    with pytest.raises(ArtifactError, match=r"holds a StableDiffusionPipeline, not an SDXL pipeline .*set teacher.family: sd15"):
        teacher.resolve(str(teachers["sd15"]), "sdxl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="is not a diffusers pipeline directory \\(no model_index.json\\)"):
        teacher.resolve(str(tmp_path / "plain"), "sdxl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="has no prompts \\(the file is empty"):
        prompts.load_prompts(str(tmp_path / "empty.txt"))
    dataset = sd.write_prompt_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match=r"prompts.text_column: .* has no column 'text' \(columns: \['caption', 'image'\]\)"):
        prompts.load_prompts(str(dataset), "text")


def test_encode_stage_reports_a_missing_teacher_in_one_line(tmp_path):
    params = sd.sd_params("sdxl")
    params["teacher"]["path"] = str(tmp_path / "missing-sdxl")
    params["prompts"]["source"] = str(sd.write_prompt_file(tmp_path / "prompts.txt"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/t2i/encode.py"), "--params", "params.yaml",
                           "--out", "encode"], cwd=tmp_path, env=sd.project_env(ROOT), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"[encode] error: teacher.path: {tmp_path / 'missing-sdxl'} does not exist (expected a local diffusers SDXL "
        f"pipeline directory)"]


def test_sd_params_unknown_key_and_bad_timesteps():
    from fewstep.params import ParamsError, validate

    base = {"teacher": {"path": "t"}, "prompts": {"source": "p"}}
    with pytest.raises(ParamsError, match=r"^distill.lr_rate is not a known key \(valid keys: .*student_timesteps"):
        validate({**base, "distill": {"lr_rate": 1}})
    with pytest.raises(ParamsError, match=r"^distill.student_timesteps must be a non-empty, strictly decreasing"):
        validate({**base, "distill": {"student_timesteps": [249, 999]}})
    with pytest.raises(ParamsError, match=r"^teacher.path is required"):
        validate({"prompts": {"source": "p"}, "teacher": {"family": "sd15"}})
    with pytest.raises(ParamsError, match=r"^prompts applies to the text-to-image families \(sdxl, sd15, sd3\) only; "
                                          r"this pipeline's teacher.family is edm"):
        validate({"prompts": {"source": "p"}, "teacher": {}})


def test_lora_student_trains_adapters_only_and_saves_merged(teachers, tmp_path):
    from diffusers import UNet2DConditionModel

    from fewstep.families.t2i import networks as models

    path = teachers["sdxl"]
    student = models.with_lora(_denoiser(path), rank=4, alpha=None, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainable = list(student.parameters())
    assert trainable and len(trainable) < len(list(student.unet.named_parameters()))
    student.requires_grad_(True)
    assert sum(p.requires_grad for p in student.unet.parameters()) == len(trainable)
    for name, p in student.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)  # away from LoRA's zero init, so merging changes the weights
    models.save(student, tmp_path / "student", role="student", student_timesteps=[999])
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "student" / "unet")
    assert not any("lora" in name for name in merged.state_dict())
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond, _ = _cond(path, ["x"])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, **cond.unet_kwargs(torch.float32)).sample,
                                   student.unet(x, t, **cond.unet_kwargs(torch.float32)).sample, atol=1e-4, rtol=1e-4)


FORBID = """
import runpy, sys
import diffusers, transformers
from diffusers.models.autoencoders.vae import Encoder

def forbid(name):
    def init(self, *args, **kwargs):
        raise AssertionError(f"{name} instantiated after the encode stage")
    return init

for cls in (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, transformers.T5EncoderModel,
            diffusers.AutoencoderKL, Encoder):
    cls.__init__ = forbid(cls.__name__)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _stage(folder, name, *args, trap=False, launcher=(sys.executable,), params="params.yaml"):
    cmd = [*launcher, *(["-c", FORBID] if trap else []), *sd.stage_script(name), "--params", params,
           *args]
    proc = subprocess.run(cmd, cwd=folder, env=sd.project_env(ROOT), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _prepare(folder: Path, family: str, teacher: Path) -> Path:
    """encode and trajectories run normally; the critic already runs with the trap set."""
    params = sd.sd_params(family, teacher={"path": str(teacher)},
                          prompts={"source": str(sd.write_prompt_dataset(folder / "ds")), "text_column": "caption",
                                   "image_column": "image"})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    _stage(folder, "encode", "--out", "encode")
    _stage(folder, "trajectories", "--encode", "encode", "--out", "trajectories")
    _stage(folder, "critic", "--encode", "encode", "--trajectories", "trajectories", "--out", "critic", trap=True)
    return folder


@pytest.fixture(scope="module")
def prepared(teachers, tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("sd-prepared"), "sdxl", teachers["sdxl"])


@pytest.fixture(scope="module")
def prepared_sd3(tmp_path_factory):
    """The same for a tiny SD3 teacher (fewstep.families.t2i.variants's flow family)."""
    folder = tmp_path_factory.mktemp("sd3-prepared")
    return _prepare(folder, "sd3", sd.tiny_sd3(folder / "tiny-sd3"))


@pytest.mark.slow
def test_training_stages_never_instantiate_text_encoders_or_the_vae(prepared):
    """encode caches everything; critic, distill and finetune run with the text encoders' and the VAE's
    constructors booby-trapped."""
    out = _stage(prepared, "distill", "--encode", "encode", "--trajectories", "trajectories", "--critic",
                 "critic/critic", "--out", "distill", trap=True)
    assert "real data: cached images" in out.stdout
    _stage(prepared, "finetune", "--encode", "encode", "--trajectories", "trajectories", "--distilled", "distill",
           "--out", "finetune", trap=True)
    assert (prepared / "finetune/student/unet/config.json").is_file()
    # and the trap does catch a stage that loads them
    proc = subprocess.run([sys.executable, "-c", FORBID, str(ROOT / "stages/t2i/encode.py"), "--params", "params.yaml",
                           "--out", "encode2"], cwd=prepared, env=sd.project_env(ROOT), capture_output=True, text=True)
    assert proc.returncode != 0 and "instantiated after the encode stage" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_average_gradients_and_rank0_writes(prepared):
    """Data parallel on CPU (gloo): both ranks end with identical trained weights; one output."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    out = _stage(prepared, "distill", "--encode", "encode", "--trajectories", "trajectories", "--critic",
                 "critic/critic", "--out", "distill-2ranks", launcher=torchrun)
    digests = dict(re.findall(r"rank (\d)/2: trained weights digest (\w+)", out.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], out.stdout[-2000:]
    assert (prepared / "distill-2ranks/student/unet/config.json").is_file()
    assert not list(prepared.glob(".distill-2ranks.*"))  # no leftovers from rank 1


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dmd2", "dmd", "sid", "consistency"])
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_every_objective_distills_an_sd_teacher(request, family, objective):
    """The objective registry serves every text-to-image family as it serves the default: each objective trains
    a tiny SDXL (UNet, epsilon) and a tiny SD3 (transformer, flow velocity) student through the one distill stage
    (consistency on trajectories that keep their ODE states); text encoders and the VAE never load."""
    import json

    prepared = request.getfixturevalue("prepared" if family == "sdxl" else "prepared_sd3")
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["distill"]["objective"] = objective
    params["trajectories"]["keep_states"] = objective == "consistency"
    name = f"params-{objective}.yaml"
    (prepared / name).write_text(yaml.safe_dump(params))
    trajectories = "trajectories"
    if objective == "consistency":
        trajectories = "trajectories-states"
        _stage(prepared, "trajectories", "--encode", "encode", "--out", trajectories, params=name)
    _stage(prepared, "distill", "--encode", "encode", "--trajectories", trajectories, "--critic", "critic/critic",
           "--out", f"distill-{objective}", params=name, trap=True)
    out = prepared / f"distill-{objective}"
    assert json.loads((out / "student/fewstep.json").read_text())["objective"] == objective
    assert (out / "student" / ("unet" if family == "sdxl" else "transformer") / "config.json").is_file()
    rows = (out / "live/plots/metrics/generator/loss.tsv").read_text().split("\n")[1:]
    losses = [float(row.split("\t")[1]) for row in rows if row]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.slow
def test_init_student_steps_per_batch_and_seeds_work_for_sd_as_for_the_default(prepared):
    """The distillation keys the digits pipeline had alone now serve the text-to-image families: a 4-step SDXL
    student starts from a saved 1-step one (distill.init_student) and trains every step per batch
    (steps_per_batch: all), and evaluate.seeds: 2 scores it on a second noise draw and averages."""
    import json

    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["distill"].update(student_steps=1, student_timesteps=None)
    (prepared / "params-one.yaml").write_text(yaml.safe_dump(params))
    _stage(prepared, "distill", "--encode", "encode", "--trajectories", "trajectories", "--critic", "critic/critic",
           "--out", "distill-one", params="params-one.yaml")
    params["distill"].update(student_steps=4, init_student=str(prepared / "distill-one/student"),
                             steps_per_batch="all")  # params paths are relative to the repository root
    params["evaluate"]["seeds"] = 2
    (prepared / "params-init.yaml").write_text(yaml.safe_dump(params))
    _stage(prepared, "distill", "--encode", "encode", "--trajectories", "trajectories", "--critic", "critic/critic",
           "--out", "distill-init", params="params-init.yaml")
    info = json.loads((prepared / "distill-init/student/fewstep.json").read_text())
    assert info["student_timesteps"] == [999, 749, 499, 249]
    _stage(prepared, "evaluate", "--encode", "encode", "--trajectories", "trajectories", "--student",
           "distill-init/student", "--samples", "evaluate-init/samples", "--metrics", "evaluate-init/metrics.json",
           params="params-init.yaml")
    metrics = json.loads((prepared / "evaluate-init/metrics.json").read_text())
    assert metrics["student"]["steps"] == 4 and metrics["seeds"] == 2
    assert {"fid_t", "kid_t", "fid_t_ci95"} <= set(metrics["student"]) and "fid_t" in metrics["teacher"]
    lo, hi = metrics["student"]["fid_t_ci95"]  # over the two seeds
    assert lo <= metrics["student"]["fid_t"] <= hi

    # a student of another teacher's network is refused in one line naming the key
    params["distill"]["init_student"] = str(prepared / "critic/critic")
    (prepared / "params-bad.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, *sd.stage_script("distill"), "--params", "params-bad.yaml", "--encode",
                           "encode", "--trajectories", "trajectories", "--critic", "critic/critic", "--out", "distill-bad"],
                          cwd=prepared, env=sd.project_env(ROOT), capture_output=True, text=True)
    assert proc.returncode == 1 and "error: distill.init_student: " in proc.stderr
    assert "critic/critic is a critic, expected a student" in proc.stderr


@pytest.mark.slow
def test_sd3_lora_student_keeps_the_flow_forward_and_saves_merged(prepared_sd3):
    """A LoRA student of a transformer: only adapters train, the velocity -> x0 forward stays, and the saved
    transformer has the adapters folded in."""
    from diffusers import SD3Transformer2DModel

    params = yaml.safe_load((prepared_sd3 / "params.yaml").read_text())
    params["distill"]["lora"]["rank"] = 2
    (prepared_sd3 / "params-lora.yaml").write_text(yaml.safe_dump(params))
    out = _stage(prepared_sd3, "distill", "--encode", "encode", "--trajectories", "trajectories", "--critic",
                 "critic/critic", "--out", "distill-lora", params="params-lora.yaml")
    assert "lora rank 2" in out.stdout
    merged = SD3Transformer2DModel.from_pretrained(prepared_sd3 / "distill-lora/student/transformer")
    assert not any("lora" in name for name in merged.state_dict())
    teacher = SD3Transformer2DModel.from_pretrained(prepared_sd3 / "tiny-sd3/transformer")
    changed = [name for name, w in merged.state_dict().items() if not torch.equal(w, teacher.state_dict()[name])]
    assert changed and all("attn" in name for name in changed), changed[:5]  # LoRA targets attention projections


def test_noise_range_positions_are_dmd2s_timestep_percentages():
    """t_min/t_max mean positions on the schedule in every family (0 = noisiest). For a text-to-image teacher,
    0.02..0.98 draws DMD2's timesteps 20..980, the same draws as the integer range it replaced (outputs unchanged),
    and a range at the schedule's ends stays inside the 1000 timesteps."""
    from types import SimpleNamespace

    from fewstep.families.t2i.t2i_trainer import noise_levels

    model = SimpleNamespace(log_sigmas=torch.linspace(-4, 4, 1000, dtype=torch.float64))
    sigmas = model.log_sigmas.exp().float()
    ours = noise_levels(model, 0.02, 0.98, torch.Generator().manual_seed(3), "cpu")(4096)
    before = sigmas[torch.randint(20, 981, (4096,), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(ours, before)
    ends = noise_levels(model, 0.0, 1.0, torch.Generator().manual_seed(0), "cpu")(20000)
    assert ends.min() == sigmas[0] and ends.max() == sigmas[999]
    low_noise = noise_levels(model, 0.9, 1.0, torch.Generator().manual_seed(0), "cpu")(2000)
    assert low_noise.max() <= sigmas[100]  # high positions are the clean end: timesteps 0..100
