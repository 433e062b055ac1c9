"""Crash and resume: a training run killed mid-way and rerun ends byte-identical to an uninterrupted one."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import STAGE_ARGS, env, run_stage, stage_script, tiny_params, write_params
from fewstep.core import distillation
from fewstep.pipeline.hashing import Hasher
from fewstep.core.checkpoint import Checkpointer
from toy import toy_setup


def digests(folder) -> dict[str, str]:
    """{path relative to folder: xxh3} of every file under folder."""
    found = {str(p.relative_to(folder)): Hasher().file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    assert found, f"{folder} is empty"
    return found


class Crash(Exception):
    pass


class CrashAfter(torch.nn.Module):
    """A denoiser that dies on its n-th call (a stand-in for a kill in the middle of a step)."""

    def __init__(self, inner, calls: float):
        super().__init__()
        self.inner, self.left = inner, calls
        self.unet = inner.unet

    def forward(self, x, sigma, cond):
        self.left -= 1
        if self.left < 0:
            raise Crash()
        return self.inner(x, sigma, cond)


def toy_run(folder, crash_after=float("inf"), key="run"):
    torch.set_num_threads(1)
    setup = toy_setup("dmd2")
    setup.student = CrashAfter(setup.student, crash_after)
    params = setup.params.model_copy(update={"steps": 30, "log_every": 4, "ema_decay": 0.9})
    checkpoint = Checkpointer(folder / "ckpt", 7, key, logs=folder / "out" / "live")
    distillation.fit(setup, params, folder / "out", "toy", checkpoint=checkpoint)
    return setup


def test_resumed_training_equals_uninterrupted(tmp_path):
    reference = toy_run(tmp_path / "a")
    with pytest.raises(Crash):
        toy_run(tmp_path / "b", crash_after=6 * 17 + 3)  # 6 student calls per step: dies inside step 17
    assert json.loads((tmp_path / "b/ckpt/state.json").read_text())["step"] == 14
    resumed = toy_run(tmp_path / "b")
    for a, b in zip(reference.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    assert digests(tmp_path / "a/out/live") == digests(tmp_path / "b/out/live")
    assert not (tmp_path / "b/ckpt").exists()  # a finished run removes its checkpoint


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, capsys):
    with pytest.raises(Crash):
        toy_run(tmp_path / "a", crash_after=6 * 10, key="old params")
    fresh = toy_run(tmp_path / "a", key="new params")
    assert "belongs to other params or inputs; starting fresh" in capsys.readouterr().out
    clean = toy_run(tmp_path / "b", key="new params")  # never interrupted: what starting fresh must give
    assert all(torch.equal(x, y) for x, y in zip(fresh.student.parameters(), clean.student.parameters()))
    assert digests(tmp_path / "a/out/live") == digests(tmp_path / "b/out/live")


# --- the real stages, killed with SIGKILL -------------------------------------------------------------

RESUMABLE = {"teacher.steps": 40, "teacher.checkpoint_every": 4, "critic.steps": 12, "critic.checkpoint_every": 2,
             "distill.steps": 12, "distill.checkpoint_every": 2, "finetune.steps": 10, "finetune.checkpoint_every": 2}
ARGS = {stage: STAGE_ARGS[stage] for stage in ("prepare", "teacher", "trajectories", "critic", "distill", "finetune")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    write_params(folder, tiny_params(**RESUMABLE))
    for stage, args in ARGS.items():
        run_stage(stage, folder, *args)
    return folder


def kill_mid_run(stage: str, folder, at_least: int) -> None:
    """Start the stage, SIGKILL it once its checkpoint has reached `at_least` steps."""
    state = folder / ".fewstep/checkpoints" / f"default-{stage}" / "state.json"  # <pipeline>-<stage>
    proc = subprocess.Popen([sys.executable, str(stage_script(stage)), "--params", "params.yaml",
                             *ARGS[stage]], cwd=folder, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= at_least:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, f"{stage} finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "critic", "distill", "finetune"])
def test_sigkill_then_rerun_is_byte_identical(stage, reference, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(reference, work, ignore=shutil.ignore_patterns(stage, ".fewstep"))
    every = RESUMABLE[f"{stage}.checkpoint_every"]
    at_least = every * random.Random(stage).randint(1, RESUMABLE[f"{stage}.steps"] // every - 2)
    kill_mid_run(stage, work, at_least)
    assert not (work / stage).exists(), "a killed stage left a half-written output"
    rerun = run_stage(stage, work, *ARGS[stage])
    assert "[checkpoint] resuming from step" in rerun.stdout
    assert digests(work / stage) == digests(reference / stage)
