"""The SDXL, SD1.5 and SD3 pipelines end to end on tiny random-weight teachers, through DVC (slow, run in CI)."""
import json
import re
import time

import pytest
import yaml

import sd_fixtures
from conftest import undeclared_reads
from sd_fixtures import assets, make_sd_project, run, sd_params, sdxl_project  # noqa: F401 (assets: fixture)

STAGES = ["inputs", "encode", "trajectories", "critic", "distill", "finetune", "export", "evaluate", "benchmark"]


def ran(output: str) -> list[str]:
    return [s.split(":")[-1] for s in re.findall(r"Running stage '([^']+)'", output)]


@pytest.mark.slow
def test_sdxl_pipeline_cached_rerun_param_edit_and_export(tmp_path, assets, monkeypatch):
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    import shutil

    inception = shutil.copy(assets["inception"], tmp_path / "inception.pt")  # a file this test may change
    project = sdxl_project(tmp_path, assets, benchmark={"featurizer": str(inception)})
    started = time.perf_counter()
    (tmp_path / "reads").mkdir()
    monkeypatch.setenv("FEWSTEP_PARAMS_READS", str(tmp_path / "reads"))  # each stage notes the params keys it reads
    first = run(["dvc", "repro"], project / "pipelines/sdxl")
    monkeypatch.delenv("FEWSTEP_PARAMS_READS")
    print(f"tiny sdxl pipeline: {time.perf_counter() - started:.1f} s")
    assert undeclared_reads(tmp_path / "reads", project / "pipelines/sdxl/dvc.yaml") == {}  # no stale stage
    assert ran(first.stdout) == STAGES or sorted(ran(first.stdout)) == sorted(STAGES)
    assert "real images: yes" in first.stdout + first.stderr

    again = run(["dvc", "repro"], project / "pipelines/sdxl")
    assert ran(again.stdout) == ["inputs"]  # always run: it hashes the optional inputs (memoized)

    # An optional input changes on disk (no param changes): only the stage that reads it reruns
    sd_fixtures.tiny_inception(inception, seed=1)
    changed = run(["dvc", "repro"], project / "pipelines/sdxl")
    assert ran(changed.stdout) == ["inputs", "benchmark"]

    params_file = project / "pipelines/sdxl/params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["distill"]["lr"] = 1e-6
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    edited = run(["dvc", "repro"], project / "pipelines/sdxl")
    assert ran(edited.stdout)[:2] == ["inputs", "distill"]
    assert sorted(ran(edited.stdout)) == ["benchmark", "distill", "evaluate", "export", "finetune", "inputs"]

    metrics = json.loads((project / "pipelines/sdxl/evaluate/metrics.json").read_text())
    for name in ("teacher", "student"):
        assert {"nfe", "latency_ms", "clip_score", "fid"} <= set(metrics[name]), metrics[name]
    assert metrics["student"]["nfe"] == 4 and metrics["teacher"]["nfe"] == (2 * 3 - 1) * 2
    assert metrics["skipped"] == []
    for name in ("teacher", "student"):  # fidelity to the teacher, in the configured featurizer's space
        assert metrics[name]["fid_t"] >= 0 and metrics[name]["kid_t"] > -1 and metrics[name]["pixel_w1_t"] >= 0
    assert metrics["fidelity_features"] == params["evaluate"]["fid"]["featurizer"]
    assert (project / "pipelines/sdxl/evaluate/samples/student.png").is_file()

    # DMD2's text-to-image protocol: every caption of the folder, FID against its images, CLIP against its text
    bench = json.loads((project / "pipelines/sdxl/benchmark/metrics.json").read_text())
    assert bench["protocol"]["pairs"] == 10 and bench["protocol"]["resolution"] == 512 and bench["protocol"]["seeds"] == 2
    for name in ("teacher", "student"):
        m = bench[name]
        assert {"fid", "fid_ci95", "kid", "kid_ci95", "clip_score", "clip_score_ci95", "nfe"} <= set(m), m
        for key in ("fid", "kid", "clip_score"):  # means over the 2 sampling seeds, inside their t-intervals
            assert m[f"{key}_ci95"][0] <= m[key] <= m[f"{key}_ci95"][1]
    assert "clip_score" in bench["reference"]
    for grid in ("teacher", "student", "reference"):
        assert (project / f"pipelines/sdxl/benchmark/samples/{grid}.png").is_file()
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project / "pipelines/sdxl").stdout)["data"]
    values = plots["distill generator losses"][0]["content"]["data"]["values"]
    assert values and all("step" in row for row in values)

    pipe = StableDiffusionXLPipeline.from_pretrained(project / "pipelines/sdxl/export")
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    images = pipe(["a red square", "a blue circle"], num_inference_steps=4, guidance_scale=0.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_sd15_pipeline_text_prompts_one_step(tmp_path, assets):
    import torch
    from diffusers import StableDiffusionPipeline

    project = make_sd_project(tmp_path / "project", "sd15", sd_params("sd15"), assets["sd15"], assets["text"])
    first = run(["dvc", "repro"], project / "pipelines/sd15")
    assert sorted(ran(first.stdout)) == sorted(STAGES)
    assert "real data: teacher samples" in first.stdout + first.stderr
    assert ran(run(["dvc", "repro"], project / "pipelines/sd15").stdout) == ["inputs"]
    off = json.loads((project / "pipelines/sd15/benchmark/metrics.json").read_text())
    assert off == {"skipped": [off["skipped"][0]]} and off["skipped"][0].startswith("benchmark: off (set benchmark.source")

    metrics = json.loads((project / "pipelines/sd15/evaluate/metrics.json").read_text())
    assert metrics["student"]["nfe"] == 1 and "latency_ms" in metrics["student"]
    assert any(line.startswith("clip_score: skipped") for line in metrics["skipped"])
    assert any(line.startswith("fid: skipped") for line in metrics["skipped"])
    # no featurizer, no reference: fidelity to the teacher still scored, in the teacher UNet's features
    assert metrics["fidelity_features"].startswith("teacher network")
    assert all(metrics[name]["fid_t"] >= 0 and metrics[name]["pixel_w1_t"] >= 0 for name in ("teacher", "student"))

    pipe = StableDiffusionPipeline.from_pretrained(project / "pipelines/sd15/export")
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    images = pipe("a red square", num_inference_steps=1, guidance_scale=0.0, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_sd3_pipeline_cached_rerun_lr_edit_and_export(tmp_path, assets, monkeypatch):
    """The flow-matching family through the same stages: a tiny SD3 teacher (transformer, three text encoders,
    shifted flow-matching scheduler, a VAE that shifts its latents), DMD2's losses on x0 = x_t - t v; a no-op
    rerun; a distill.lr edit reruns exactly distill onward; the exported StableDiffusion3Pipeline generates."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    project = make_sd_project(tmp_path / "project", "sd3", sd_params("sd3", prompts={"text_column": "caption",
                                                                                     "image_column": "image"}),
                              assets["sd3"], assets["dataset"])
    folder = project / "pipelines/sd3"
    (tmp_path / "reads").mkdir()
    monkeypatch.setenv("FEWSTEP_PARAMS_READS", str(tmp_path / "reads"))
    first = run(["dvc", "repro"], folder)
    monkeypatch.delenv("FEWSTEP_PARAMS_READS")
    assert sorted(ran(first.stdout)) == sorted(STAGES)
    assert undeclared_reads(tmp_path / "reads", folder / "dvc.yaml") == {}  # the flow family reads what dvc.yaml lists
    assert "sd3 student timesteps [999, 749, 499, 249]" in first.stdout and "real images: yes" in first.stdout
    assert (folder / "distill/student/transformer/config.json").is_file()
    assert ran(run(["dvc", "repro"], folder).stdout) == ["inputs"]

    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["distill"]["lr"] = 1e-6
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    edited = run(["dvc", "repro"], folder)
    assert sorted(ran(edited.stdout)) == ["benchmark", "distill", "evaluate", "export", "finetune", "inputs"]

    metrics = json.loads((folder / "evaluate/metrics.json").read_text())
    assert metrics["student"]["nfe"] == 4 and metrics["teacher"]["nfe"] == (2 * 3 - 1) * 2
    assert metrics["fidelity_features"].startswith("teacher network")
    assert all(metrics[name]["fid_t"] >= 0 and metrics[name]["latency_ms"] > 0 for name in ("teacher", "student"))

    call = json.loads((folder / "export/fewstep.json").read_text())
    assert call["sigmas"] == [1.0, 0.75, 0.5, 0.25] and call["usage"].startswith("StableDiffusion3Pipeline")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder / "export")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.stochastic_sampling
    images = pipe(["a red square", "a blue circle"], num_inference_steps=4, sigmas=call["sigmas"], guidance_scale=0.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # the scheduler shifts the sigmas as the teacher's training did: the student's own t_i
    assert pipe.scheduler.timesteps.tolist() == pytest.approx([1000.0, 900.0, 750.0, 500.0])
    one = pipe("a red square", num_inference_steps=1, guidance_scale=0.0, output_type="pt").images
    assert one.shape == (1, 3, 16, 16) and torch.isfinite(one).all()
