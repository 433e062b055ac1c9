"""torchrun data parallelism on CPU (gloo, 2 processes): the same loss trajectory and weights as one
process at the same global batch."""
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CURVES, ROOT, STAGE_ARGS, run, run_stage, tiny_params, write_params

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def losses(folder):
    rows = (folder / "teacher/live/plots/metrics/teacher/loss.tsv").read_text().split("\n")[1:]
    return [tuple(map(float, row.split("\t"))) for row in rows if row]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_trajectory(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    params = tiny_params(**{"teacher.steps": 30, "teacher.batch_size": 16, "run.num_threads": 1})
    write_params(base, params)
    run_stage("prepare", base, "--out", "prepare")
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(base, one)
    shutil.copytree(base, two)
    run_stage("teacher", one, "--prepare", "prepare", "--out", "teacher")
    run([*TORCHRUN, str(ROOT / "stages/edm/teacher.py"), "--params", "params.yaml", "--prepare", "prepare",
         "--out", "teacher"], two)

    single, double = losses(one), losses(two)
    assert [step for step, _ in single] == [step for step, _ in double] == [10, 20, 30]
    for (_, a), (_, b) in zip(single, double):
        assert b == pytest.approx(a, rel=1e-4)  # averaged gradients of two half batches = the whole batch
    weights = [load_file(f / "teacher/model/unet/diffusion_pytorch_model.safetensors") for f in (one, two)]
    # Summation order differs between one batch and two all-reduced halves; Adam divides by sqrt(v), so for
    # a weight whose gradient is ~0 that rounding can change a step by up to lr (all of an attention key
    # bias: softmax ignores it, its gradient is pure rounding). The weights as a whole must still agree to
    # float precision, and no weight may be off by more than one Adam step.
    diffs = {key: (weights[1][key] - weights[0][key]).abs() for key in weights[0]}
    assert torch.cat([d.flatten() for d in diffs.values()]).mean() < 1e-6
    lr = params["teacher"]["lr"]
    assert {key: float(d.max()) for key, d in diffs.items() if d.max() >= lr} == {}
    assert not list(two.glob("teacher/**/rank*")), "only rank 0 writes the stage output"


@pytest.mark.slow
def test_two_process_distillation_runs_and_saves_once(tmp_path):
    write_params(tmp_path, tiny_params(**{"run.num_threads": 1, **CURVES}))
    for stage, args in (("prepare", ["--out", "prepare"]), ("teacher", ["--prepare", "prepare", "--out", "teacher"]),
                        ("trajectories", STAGE_ARGS["trajectories"])):
        run_stage(stage, tmp_path, *args)
    run([*TORCHRUN, str(ROOT / "stages/critic.py"), "--params", "params.yaml", *STAGE_ARGS["critic"]], tmp_path)
    proc = run([*TORCHRUN, str(ROOT / "stages/distill.py"), "--params", "params.yaml", *STAGE_ARGS["distill"]],
               tmp_path)
    assert "batch=4x1" in proc.stdout  # 8 samples per update, 4 on each of the 2 processes
    assert (tmp_path / "distill/student/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "distill/live/plots/metrics/generator/dm.tsv").is_file()
    # rank 0 alone scores the quality curve, its torchmetrics kept off the process group (no hang, no sync)
    rows = (tmp_path / "distill/live/plots/metrics/quality/kid_t.tsv").read_text().split()
    assert rows[0::2] == ["step", "0", "3"]


@pytest.mark.parametrize("family", ["default", "sd"])
def test_batch_size_is_the_global_batch_for_every_family(family, monkeypatch):
    """Rank 1 of 2 trains on half of `batch_size` with its own rank-salted noise, for the digits and the SD
    params alike; a batch that does not divide is one line naming the key."""
    from fewstep.core.parallel import per_rank
    from fewstep.params import validate

    t2i = {"teacher": {"path": "t", "family": "sdxl"}, "prompts": {"source": "p"}} if family == "sd" else {}
    settings = validate({**t2i, "distill": {"batch_size": 8}}).distill
    assert per_rank(settings, "distill", torch.Generator().manual_seed(5)) is settings  # one process: as written
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    generator = torch.Generator().manual_seed(5)
    mine = per_rank(settings, "distill", generator)
    assert mine.batch_size == 4 and settings.batch_size == 8 and generator.initial_seed() == 6
    with pytest.raises(ValueError, match=r"^distill.batch_size \(7\) must divide over 2 processes"):
        per_rank(settings.model_copy(update={"batch_size": 7}), "distill", generator)
