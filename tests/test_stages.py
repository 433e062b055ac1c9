"""Each stage on tiny params, run as its own script in dependency order, outputs checked."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CURVES, ROOT, STAGE_ARGS, run_stage, tiny_params, undeclared_reads, write_params
from fewstep.families.edm.unet import load_model



LOGS = {}  # stage -> its completed process, from the module's one pipeline run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("stages")
    write_params(folder, tiny_params(**CURVES))
    (folder / "reads").mkdir()
    os.environ["FEWSTEP_PARAMS_READS"] = str(folder / "reads")  # each stage notes the params keys it reads
    try:
        for stage, args in STAGE_ARGS.items():
            LOGS[stage] = run_stage(stage, folder, *args)
    finally:
        del os.environ["FEWSTEP_PARAMS_READS"]
    return folder


def test_every_stage_lists_the_params_it_reads(workdir):
    """dvc.yaml's params of each stage cover every key the stage read (DVC reruns a stage only for those)."""
    assert undeclared_reads(workdir / "reads", ROOT / "dvc.yaml") == {}
    critic = json.loads((workdir / "reads/critic.json").read_text())
    assert "critic.lr" in critic and "distill.t_min" in critic and "distill.lr" not in critic  # its own loop keys


@pytest.mark.parametrize("objective", ["dmd", "sid", "consistency"])
def test_the_critic_lists_what_every_objective_reads(workdir, tmp_path, objective):
    """The critic reads a subset of distill's keys; for every objective and the multi-step options it still
    reads only listed ones (a 4-step student with per-step critics, all steps per batch, EMA simulation)."""
    import os
    import shutil

    folder = tmp_path / "project"
    shutil.copytree(workdir, folder, ignore=shutil.ignore_patterns("reads", "critic", "distill", "finetune", "evaluate"))
    write_params(folder, tiny_params(**{"distill.objective": objective, "distill.student_steps": 4,
                                        "distill.per_step_critic": True, "distill.steps_per_batch": "all",
                                        "distill.simulate_with": "ema"}))
    (folder / "reads").mkdir()
    os.environ["FEWSTEP_PARAMS_READS"] = str(folder / "reads")
    try:
        run_stage("critic", folder, *STAGE_ARGS["critic"])
    finally:
        del os.environ["FEWSTEP_PARAMS_READS"]
    stages = {"critic": yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["critic"]}
    (folder / "critic.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert undeclared_reads(folder / "reads", folder / "critic.yaml") == {}


def test_prepare(workdir):
    data = load_file(workdir / "prepare/data.safetensors")
    assert data["train_images"].shape[1:] == (1, 8, 8) and data["test_images"].shape[1:] == (1, 8, 8)
    assert data["train_images"].min() >= -1 and data["train_images"].max() <= 1
    assert len(data["train_labels"]) + len(data["test_labels"]) == 1797
    info = json.loads((workdir / "prepare/info.json").read_text())
    assert info["num_test"] == 359 and len(info["class_names"]) == 10
    ref = load_file(workdir / "prepare/reference.safetensors")
    assert ref["features"].shape == (359, 128) and ref["cov"].shape == (128, 128)
    assert "featurizer test accuracy" in LOGS["prepare"].stdout


def test_teacher_is_a_diffusers_model(workdir):
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(workdir / "teacher/model/unet")
    assert unet.config.num_class_embeds == 11  # 10 classes + null label
    model, info = load_model(workdir / "teacher/model")
    assert info["role"] == "teacher"
    x = model(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 10]))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert (workdir / "teacher/live/plots/metrics/teacher/loss.tsv").is_file()


def test_trajectories_are_sharded(workdir):
    index = json.loads((workdir / "trajectories/index.json").read_text())
    assert [s["count"] for s in index["train"]["shards"]] == [25, 15]
    assert index["nfe"] == 5 and len(index["sigmas"]) == 4 and index["sigmas"][-1] == 0
    shard = load_file(workdir / "trajectories" / index["train"]["shards"][1]["file"])
    assert shard["states"].shape == (15, 4, 1, 8, 8)
    assert torch.equal(shard["cond_index"], torch.arange(25, 40) % 10)  # the classes in turn
    assert torch.equal(shard["states"][:, -1], shard["samples"])
    assert torch.allclose(shard["states"][:, 0], shard["noise"] * index["sigmas"][0])


def test_critic_distill_finetune_outputs(workdir):
    for stage in ("critic", "distill", "finetune"):
        assert (workdir / stage / "critic/gan_head.safetensors").is_file()
        assert (workdir / stage / "live/plots/metrics/critic/denoise.tsv").is_file()
    for stage in ("distill", "finetune"):
        student, info = load_model(workdir / stage / "student")
        assert info["role"] == "student" and info["student_sigmas"] == [80.0]
        assert (workdir / stage / "live/plots/metrics/generator/dm.tsv").is_file()
    assert not (workdir / "critic/student").exists()  # the critic stage trains no student
    # quality curves (eval_every 50/20 in params.yaml): before the first step and at the last, on the EMA student
    for stage, last in (("distill", 3), ("finetune", 2)):
        for name in ("kid_t", "fid", "pixel_w1"):
            rows = (workdir / stage / f"live/plots/metrics/quality/{name}.tsv").read_text().split()
            assert rows[0::2] == ["step", "0", str(last)] and all(float(v) >= 0 for v in rows[3::2]), (stage, name)
    # distillation moved the student away from its teacher initialization
    teacher, _ = load_model(workdir / "teacher/model")
    student, _ = load_model(workdir / "distill/student")
    assert any(not torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_evaluate_metrics_shape(workdir):
    metrics = json.loads((workdir / "evaluate/metrics.json").read_text())
    for model in ("teacher", "teacher_1nfe", "student@1"):
        assert set(metrics[model]) >= {"fid", "fid_std", "precision", "recall", "cond_accuracy", "nfe", "latency_ms"}
        assert metrics[model]["fid"] >= 0 and 0 <= metrics[model]["precision"] <= 1
        assert len(metrics[model]["fid_per_seed"]) == metrics["seeds"] == 3
        assert metrics[model]["fid"] == pytest.approx(sum(metrics[model]["fid_per_seed"]) / 3)
    assert metrics["teacher"]["nfe"] == 5 and metrics["student@1"]["nfe"] == 1 and metrics["student_steps"] == 1
    assert metrics["speedup"] > 1  # 5 NFE against 1, timed at the same batch
    for model in ("teacher", "student@1"):
        m = metrics[model]
        for key in ("fid", "kid", "fid_t", "kid_t"):  # the teacher's FID-T: against its own seed-0 samples
            low, high = m[f"{key}_ci95"]
            assert low <= m[key] <= high, (model, key)
        assert 0 <= m["pixel_faint"] <= 1 and m["pixel_w1"] >= 0
    floor = metrics["floor"]
    assert floor["num_images"] + floor["num_reference"] == metrics["num_reference"]
    assert floor["splits"] == 20 and 0 <= floor["teacher_wins"] <= 20
    assert floor["fid_range95"][0] <= floor["fid"] <= floor["fid_range95"][1] and floor["teacher"]["fid"] > 0
    for name in ("teacher.png", "student_1.png"):
        assert (workdir / "evaluate/samples" / name).stat().st_size > 100


def test_sample_cli(workdir, tmp_path):
    from conftest import run
    import sys

    out = tmp_path / "grid.png"
    proc = run([sys.executable, "-m", "fewstep.cli", "sample", "--model", str(workdir / "finetune/student"),
                "--steps", "1", "--out", str(out), "--rows", "3"], workdir)
    assert out.is_file() and "1 NFE" in proc.stdout
    from PIL import Image

    assert Image.open(out).size[0] > 3 * 8
    proc = run([sys.executable, "-m", "fewstep.cli", "sample", "--model", str(workdir / "prepare"),
                "--out", str(tmp_path / "x.png")], workdir, check=False)
    assert proc.returncode == 1 and "not a fewstep model directory" in proc.stderr


def test_stage_failure_leaves_no_half_written_output(workdir):
    """evaluate pointed at a corrupted trajectory shard: one clear line, no outputs, no temp dirs."""
    import shutil

    broken = workdir / "broken_traj"
    shutil.copytree(workdir / "trajectories", broken)
    shard = broken / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    args = list(STAGE_ARGS["evaluate"])
    args[args.index("trajectories")] = "broken_traj"
    args[args.index("evaluate/samples")] = "eval2/samples"
    args[args.index("evaluate/metrics.json")] = "eval2/metrics.json"
    proc = run_stage("evaluate", workdir, *args, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == ["[evaluate] error: broken_traj/train-00001.safetensors: not a readable safetensors file"
                     + lines[0].split("safetensors file", 1)[1]]
    assert not (workdir / "eval2/metrics.json").exists() and not (workdir / "eval2/samples").exists()
    left = sorted(p.name for p in (workdir / "eval2").iterdir()) if (workdir / "eval2").exists() else []
    assert left == [], f"half-written or temporary files left behind: {left}"  # e.g. .metrics.json.<id>.tmp


def test_same_params_same_bytes(workdir, tmp_path):
    """Determinism on CPU: rerunning prepare and teacher with the same params gives identical files."""
    write_params(tmp_path, tiny_params())
    for stage in ("prepare", "teacher"):
        run_stage(stage, tmp_path, *STAGE_ARGS[stage])
    for rel in ("prepare/data.safetensors", "prepare/featurizer/featurizer.safetensors",
                "teacher/model/unet/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / rel).read_bytes() == (workdir / rel).read_bytes(), rel


def test_step_subsets_reproduces_evaluate(workdir, tmp_path):
    """bench/step_subsets.py shares evaluate's noise streams, so the student's own schedule scores the same."""
    import sys
    from conftest import ROOT, run

    run([sys.executable, str(ROOT / "bench/step_subsets.py"), "--workspace", str(workdir), "--student",
         str(workdir / "finetune/student"), "--steps", "teacher", "0", "0,t0.5", "--seeds", "3", "--vs-train",
         "--results", str(tmp_path), "--name", "s"], workdir)
    teacher, row, with_teacher = json.loads((tmp_path / "s.json").read_text())["rows"]
    metrics = json.loads((workdir / "evaluate/metrics.json").read_text())
    assert row["fid_per_seed"] == pytest.approx(metrics["student@1"]["fid_per_seed"], rel=1e-5)
    assert teacher["fid_per_seed"] == pytest.approx(metrics["teacher"]["fid_per_seed"], rel=1e-5)
    # against the training images instead of the held-out ones: a different, finite number
    assert all(r["fid_vs_train"] > 0 and r["fid_vs_train"] != r["fid"] for r in (teacher, row, with_teacher))
    assert "FID vs train" in (tmp_path / "s.md").read_text()
    assert len(set(row["fid_per_seed"])) == 3  # three different noise draws, not one reused
    # a teacher step at sigma 0.5 after the student's: two noise levels, and it changes the samples
    assert with_teacher["sigmas"] == [80.0, 0.5] and with_teacher["fid_per_seed"] != row["fid_per_seed"]
    assert (tmp_path / "s.md").read_text().count("\n| 0 |") == 1
    bad = run([sys.executable, str(ROOT / "bench/step_subsets.py"), "--workspace", str(workdir), "--student",
               str(workdir / "finetune/student"), "--steps", "0,5", "--results", str(tmp_path)], workdir, check=False)
    assert bad.returncode != 0 and "--steps 0,5: expected decreasing noise levels" in bad.stderr


def test_latency_is_timed_on_the_generated_batches(workdir):
    """One timing per generated batch (per image, ms); with a single seed the teacher, whose seed-0 images come
    from the trajectories, is still timed."""
    from fewstep.core.sampling import batched

    timings = []
    out = batched(lambda n, c: n * 2, torch.ones(10, 1, 2, 2), torch.zeros(10), 4, "cpu", timings=timings)
    assert torch.equal(out, torch.full((10, 1, 2, 2), 2.0)) and len(timings) == 3 and min(timings) > 0

    params = tiny_params(**{"evaluate.seeds": 1})
    write_params(workdir, params)
    try:
        args = list(STAGE_ARGS["evaluate"])
        args[args.index("evaluate/samples")] = "eval1/samples"
        args[args.index("evaluate/metrics.json")] = "eval1/metrics.json"
        run_stage("evaluate", workdir, *args)
    finally:
        write_params(workdir, tiny_params())
    metrics = json.loads((workdir / "eval1/metrics.json").read_text())
    assert metrics["seeds"] == 1 and metrics["teacher"]["latency_ms"] > metrics["student@1"]["latency_ms"] > 0


def test_newcomer_compare_cli_grid_and_table(workdir, tmp_path):
    """`fewstep compare`: both models on the same noise and labels; the table carries intervals and a verdict,
    the grid names its rows; one seed says there is no interval; too few samples is one line."""
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from conftest import run

    fewstep = str(Path(sys.executable).parent / "fewstep")
    proc = run([fewstep, "compare", "teacher/model", "distill/student", "--samples", "40", "--seeds", "2",
                "--rows", "2", "--out", str(tmp_path / "cmp.png"), "--table", str(tmp_path / "cmp.md")], workdir)
    table = (tmp_path / "cmp.md").read_text()
    assert "| teacher/model |" in table and "| distill/student |" in table and " [" in table
    assert "against teacher/model's samples" in table and ("differ" in table)
    width, height = Image.open(tmp_path / "cmp.png").size
    grid_width = 10 * (8 * 8 + 8) + 8  # ten 8x8 images at 8x, one-pixel borders at 8x
    assert height == 4 * (8 * 8 + 8) + 8 and width > grid_width + 50  # four rows, and a margin with their labels
    margin = np.asarray(Image.open(tmp_path / "cmp.png").convert("L"))[:, : width - grid_width]
    assert (margin < 128).sum() > 100  # dark text on the white margin
    one = run([fewstep, "compare", "teacher/model", "distill/student", "--samples", "40", "--seeds", "1",
               "--out", str(tmp_path / "one.png")], workdir)
    assert "One sampling seed gives no interval, so no verdict" in one.stdout and "differ" not in one.stdout
    assert "[95%]" not in one.stdout.split("One sampling seed")[0]  # no interval, so none announced
    few = run([fewstep, "compare", "teacher/model", "distill/student", "--samples", "1"], workdir, check=False)
    assert few.returncode == 2 and few.stderr.strip().splitlines()[-1].startswith(
        "fewstep compare: error: --samples must be >= 4 (precision and recall use each sample's 3 nearest"), few.stderr
    bad = run([fewstep, "compare", "teacher/model", "distill/student", "--prepare", "nowhere"], workdir, check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "fewstep compare: error: --prepare nowhere/featurizer does not exist (run the prepare stage: dvc repro prepare)"]
