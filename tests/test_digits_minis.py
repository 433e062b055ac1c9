"""The text-to-image families on mini teachers trained here from real digits (pipelines/<family>-digits), end to
end through DVC with shrunk params: the mini teacher's stages, then exactly the stages of the real pipelines, then
the judge through plain diffusers (slow, run in CI). The full-size runs are a benchmark: bench/digits_minis.py."""
import json
import re
import shutil
import time

import pytest
import yaml

from conftest import _merge, undeclared_reads
from sd_fixtures import ROOT, run

#: Every stage's code path in seconds (one thread: parallel test jobs share the cores).
DIGITS_TINY = {
    "run": {"device": "cpu", "precision": "fp32", "num_threads": 1},
    "featurizer": {"steps": 20},
    "teacher": {"mini": {"vae": {"steps": 4}, "steps": 4, "checkpoint_every": 2, "sampling_steps": 2}},
    "prompts": {"eval_count": 2},
    "trajectories": {"num_samples": 4, "eval_per_prompt": 2, "sampling_steps": 2, "batch_size": 4},
    "critic": {"steps": 1, "batch_size": 2},
    "distill": {"steps": 1, "batch_size": 2, "dmd2": {"ttur": 1}},
    "finetune": {"steps": 1, "batch_size": 2},
    "evaluate": {"batch_size": 4, "grid_size": 2},
    "judge": {"per_class": 1, "seeds": 2, "batch_size": 10, "grid_size": 1},
}
MINI_STAGES = ["prepare", "captions", "mini_vae", "mini_teacher"]
SHARED_STAGES = ["inputs", "encode", "trajectories", "critic", "distill", "finetune", "export", "evaluate", "benchmark"]


def digits_project(folder, name: str):
    """A fresh git + DVC repo with the library, the stage scripts and pipelines/<name> (links resolved) shrunk."""
    folder.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in ("fewstep", "stages", "flows"):
        shutil.copytree(ROOT / item, folder / item, ignore=ignore)
    for item in (".gitignore", ".dvcignore", "prefect.yaml"):
        shutil.copy(ROOT / item, folder / item)
    pipeline = folder / "pipelines" / name
    shutil.copytree(ROOT / "pipelines" / name, pipeline, ignore=shutil.ignore_patterns(
        "dvc.lock", "tmp", "cache", "config.local", "prepare", "captions", "vae", "teacher", "encode", "trajectories",
        "critic", "distill", "finetune", "export", "evaluate", "benchmark", "inputs", "judge"))
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    (pipeline / "params.yaml").write_text(yaml.safe_dump(_merge(params, DIGITS_TINY), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "test"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(cmd, folder)
    return pipeline


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3"])
def test_digits_pipeline_trains_distills_exports_and_judges(tmp_path, family, monkeypatch):
    import torch
    from diffusers import DiffusionPipeline

    from fewstep.families.t2i import mini

    pipeline = digits_project(tmp_path / "project", f"{family}-digits")
    (tmp_path / "reads").mkdir()
    monkeypatch.setenv("FEWSTEP_PARAMS_READS", str(tmp_path / "reads"))
    started = time.perf_counter()
    first = run(["dvc", "repro"], pipeline)
    monkeypatch.delenv("FEWSTEP_PARAMS_READS")
    print(f"tiny {family}-digits pipeline: {time.perf_counter() - started:.1f} s")
    ran = [s.split(":")[-1] for s in re.findall(r"Running stage '([^']+)'", first.stdout)]
    assert sorted(ran) == sorted(MINI_STAGES + SHARED_STAGES + ["judge@prepare"]), ran
    assert undeclared_reads(tmp_path / "reads", pipeline / "dvc.yaml", pipeline / "mini/dvc.yaml") == {}
    # nothing stale: only the inputs stage, which is always changed by design (it hashes optional inputs)
    assert run(["dvc", "status"], pipeline).stdout.split() == ["inputs:", "always", "changed"]

    # the teacher is the family's own diffusers pipeline, with its recommended call
    teacher = pipeline / "teacher"
    index = json.loads((teacher / "model_index.json").read_text())
    expected = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}
    assert index["_class_name"] == expected[family]
    assert json.loads((teacher / "fewstep.json").read_text())["num_inference_steps"] == 2

    # judged through plain diffusers: both models, with intervals over the seeds
    metrics = json.loads((pipeline / "judge/metrics.json").read_text())
    for name in ("teacher", "student", "teacher_heun", "student_fewstep"):  # diffusers' calls, fewstep's samplers
        m = metrics[name]
        assert 0 <= m["prompt_accuracy"] <= 1 and m["fid"] >= 0 and len(m["fid_ci95"]) == 2, m
        assert m["images"] == 10 and m["latency_ms"] > 0
    assert metrics["student"]["fid_t"] >= 0 and metrics["student"]["call"]["guidance_scale"] == 0.0
    assert (pipeline / "judge/samples/student.png").is_file()

    # the export is what a user loads: plain diffusers, its fewstep.json call
    usage = json.loads((pipeline / "export/fewstep.json").read_text())
    call = {k: usage[k] for k in ("num_inference_steps", "guidance_scale", "sigmas") if k in usage}
    pipe = DiffusionPipeline.from_pretrained(pipeline / "export")
    assert type(pipe).__name__ == expected[family]
    image = pipe(mini.caption(7), output_type="pt", generator=torch.Generator().manual_seed(0), **call).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
