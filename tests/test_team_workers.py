"""Stages placed on Prefect workers: a gpu and a cpu worker, each in its own clone and home, sharing
nothing but the Prefect server and the S3 server."""
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import make_project, tiny_params
from team import BIN, S3_CREDENTIALS, commit, machine, make_bucket, moto, report, s3_remote, s3_toy_team, stop

STAGES = ["prepare", "teacher", "trajectories", "critic", "distill", "finetune", "evaluate"]
GPU = {"teacher", "trajectories", "critic", "distill", "finetune"}


def setup_pools(m, within: int | None = None) -> None:
    """docs/team.md's step 3, as written there: flows/setup.sh (pools, the zombie automation, deployments)."""
    if within:  # the test waits for a crash: a shorter silence than production's 90 s
        m.extra_env = {**m.extra_env, "CRASH_AFTER_S": str(within)}
    m.sh("bash", "flows/setup.sh")


def stage_runs(api: str, since) -> dict[str, list[tuple[str, str]]]:
    """{deployment name: [(stage, final state)]} of every fewstep-stage flow run a worker ran since `since`
    (this session's server also holds other tests' runs: direct calls, and earlier tests' deployment runs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterDeploymentId,
                                                FlowRunFilterStartTime)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    # named, not taken from os.environ: Prefect reads its settings once per process, and another test in this
    # pytest process may have imported prefect before this server existed (then the client asked another API)
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["fewstep-stage"])),
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(is_null_=False),
                                          start_time=FlowRunFilterStartTime(after_=since)),
            limit=200)
        names = {}
        out: dict[str, list] = {}
        for r in runs:
            if r.deployment_id not in names:
                names[r.deployment_id] = client.read_deployment(r.deployment_id).name
            out.setdefault(names[r.deployment_id], []).append((r.parameters["stage"], r.state.name))
    return out


@pytest.mark.slow
def test_worker_team_s3_stages_on_gpu_and_cpu_workers_then_a_third_clone_computes_nothing(tmp_path, own_prefect_server):
    api = own_prefect_server["url"]
    endpoint, server = moto(tmp_path)
    workers = []
    try:
        make_bucket(endpoint, "team")
        project = make_project(tmp_path / "origin", tiny_params())
        s3_remote(project, endpoint, "team")
        commit(project)
        gpu = machine(project, tmp_path / "gpu", api, S3_CREDENTIALS)
        cpu = machine(project, tmp_path / "cpu", api, S3_CREDENTIALS)
        setup_pools(cpu)
        workers = [gpu.worker("gpu"), cpu.worker("cpu")]

        # the deployment README names: the orchestrating flow itself runs on the cpu worker
        since = datetime.now(timezone.utc)
        run = cpu.sh(str(BIN / "prefect"), "deployment", "run", "distill/digits", "--watch", "--watch-timeout", "900")
        assert "Completed" in run.stdout, run.stdout[-3000:]
        recorded = stage_runs(api, since)
        assert "gpu" in recorded, (recorded, run.stdout[-3000:])
        assert sorted(s for s, _ in recorded["gpu"]) == sorted(GPU)
        assert sorted(s for s, _ in recorded["cpu"]) == ["evaluate", "prepare"]
        assert all(state == "Completed" for runs in recorded.values() for _, state in runs)
        metrics = cpu.checkout("flow") / "evaluate" / "metrics.json"  # the orchestrating run's workspace
        assert json.loads(metrics.read_text())["student@1"]["nfe"] == 1
        assert gpu.unchanged() and cpu.unchanged()  # the workers' own clones: `git pull` updates them

        # a third machine: an evaluation edit fetches the evaluation's inputs, not the training outputs
        third = machine(project, tmp_path / "third", api, S3_CREDENTIALS)
        edited = report(third.flow("--set", "evaluate.seeds=2"))
        assert edited == {**{s: "cached" for s in STAGES}, "evaluate": "computed"}
        assert all((third.root / s).is_dir() for s in ("prepare", "teacher", "trajectories", "finetune"))
        assert not (third.root / "critic").exists() and not (third.root / "distill").exists()

        # ... and the team's default run is all verified hits; with --fetch all every output comes over
        assert third.sh("git", "status", "--porcelain", "params.yaml").stdout == ""  # --set: that run only
        proc = third.flow("--fetch", "all")
        assert report(proc) == {s: "cached" for s in STAGES}
        assert all(f"{s}: outputs" in proc.stdout + proc.stderr for s in STAGES)
        assert (third.root / "evaluate" / "metrics.json").read_bytes() == metrics.read_bytes()
    finally:
        for w in workers:
            stop(w)
        stop(server)


def _kill_machine(home: Path) -> int:
    """Kill every process of one "machine": those whose HOME is its home (its worker, the flow run the worker
    started, the stage that run started)."""
    killed = 0
    marker = f"HOME={home}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), 9)
                    killed += 1
            except OSError:
                pass
    return killed


@pytest.mark.slow
def test_worker_killed_mid_stage_fails_in_one_line_and_a_rerun_recomputes_only_that_stage(tmp_path, own_prefect_server):
    import subprocess

    api = own_prefect_server["url"]
    endpoint, server = moto(tmp_path)
    workers, parent = [], None
    try:
        project = s3_toy_team(tmp_path, endpoint)
        origin = machine(project, tmp_path / "a", api, S3_CREDENTIALS)
        gpu = machine(project, tmp_path / "gpu", api, S3_CREDENTIALS)
        cpu = machine(project, tmp_path / "cpu", api, S3_CREDENTIALS)
        setup_pools(cpu, within=45)
        gpu.extra_env = {"TOY_SLOW": str(gpu.home / "slow"), "TOY_STARTED": str(gpu.home / "started-make")}
        workers = [gpu.worker("gpu"), cpu.worker("cpu")]

        # `make` (gpu pool) waits while `slow` exists on the gpu machine, long enough to kill that machine
        (gpu.home / "slow").write_text("1")
        parent = subprocess.Popen([sys.executable, "flows/distill.py", "--workers"], cwd=origin.root, env=origin.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while not (gpu.home / "started-make").exists():
            assert time.time() < deadline and parent.poll() is None, parent.communicate()
            time.sleep(0.5)
        assert _kill_machine(gpu.home) >= 3  # the gpu machine dies: its worker, the stage's flow run, the stage
        out, err = parent.communicate(timeout=300)
        assert parent.returncode == 1, out[-2000:] + err[-2000:]
        line = [l for l in err.splitlines() if l.startswith("distill: error:")]
        assert len(line) == 1 and "Traceback" not in out + err, err[-3000:]
        assert line[0].startswith("distill: error: stage make on pool gpu (flow run "), line
        assert "worker lost: no heartbeat from this stage run" in line[0], line
        assert line[0].endswith("start a worker on pool gpu and rerun: finished stages are kept"), line
        assert (out + err).count("worker lost") == 1, err[-3000:]
        assert "[base on pool cpu] " in err  # the workers' log lines, relayed to the laptop's terminal

        # a gpu worker is back: base (done before the crash) is a hit, make and what follows it run
        (gpu.home / "slow").unlink()
        workers.append(gpu.worker("gpu"))
        assert report(origin.flow("--workers")) == {"base": "cached", "make": "computed", "total": "computed"}
        assert (gpu.checkout() / "runs.log").read_text() == "make\n"
        assert (cpu.checkout() / "runs.log").read_text() == "base\ntotal\n"
        assert gpu.unchanged() and cpu.unchanged()
        assert report(origin.flow("--workers")) == {"base": "cached", "make": "cached", "total": "cached"}
    finally:
        if parent is not None and parent.poll() is None:
            parent.kill()
        for w in workers:
            stop(w)
        stop(server)
