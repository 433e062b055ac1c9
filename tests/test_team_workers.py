"""Stages placed on Prefect workers: a gpu and a cpu worker, each in its own clone and home, sharing
nothing but the Prefect server and the S3 server."""
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_project, tiny_params
from team import (BIN, S3_CREDENTIALS, commit, machine, make_bucket, moto, report, s3_remote, stop, toy_project)

STAGES = ["prepare", "teacher", "trajectories", "critic", "distill", "finetune", "evaluate"]
GPU = {"teacher", "trajectories", "critic", "distill", "finetune"}


def setup_pools(m, within: int | None = None) -> None:
    """What README's team section does once per Prefect server: pools, the zombie automation, deployments."""
    for pool in ("cpu", "gpu"):
        m.sh(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite")
    automations = yaml.safe_load((ROOT / "flows" / "automations.yaml").read_text())
    if within:  # the test waits for a crash: a shorter silence than production's 90 s
        automations["automations"][0]["trigger"]["within"] = within
    (m.home / "automations.yaml").write_text(yaml.safe_dump(automations))
    m.sh(str(BIN / "prefect"), "automation", "create", "--from-file", str(m.home / "automations.yaml"))
    m.sh(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")


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
def test_worker_team_s3_stages_on_gpu_and_cpu_workers_then_a_third_clone_computes_nothing(tmp_path, prefect_server):
    api = prefect_server["url"]
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
        assert json.loads((cpu.root / "evaluate" / "metrics.json").read_text())["student@1"]["nfe"] == 1

        # a third machine: an evaluation edit fetches the evaluation's inputs, not the training outputs
        third = machine(project, tmp_path / "third", api, S3_CREDENTIALS)
        edited = report(third.flow("--set", "evaluate.seeds=2"))
        assert edited == {**{s: "cached" for s in STAGES}, "evaluate": "computed"}
        assert all((third.root / s).is_dir() for s in ("prepare", "teacher", "trajectories", "finetune"))
        assert not (third.root / "critic").exists() and not (third.root / "distill").exists()

        # ... and the team's default run is all verified hits; with --fetch all every output comes over
        third.sh("git", "checkout", "params.yaml")
        proc = third.flow("--fetch", "all")
        assert report(proc) == {s: "cached" for s in STAGES}
        assert all(f"{s}: outputs" in proc.stdout + proc.stderr for s in STAGES)
        assert (third.root / "evaluate" / "metrics.json").read_bytes() == (cpu.root / "evaluate" / "metrics.json").read_bytes()
    finally:
        for w in workers:
            stop(w)
        stop(server)


def _kill_processes_in(folder: Path) -> int:
    """Kill every process whose working directory is `folder` (a worker and the stage run it started)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")) == folder:
                    os.kill(int(proc.name), 9)
                    killed += 1
            except OSError:
                pass
    return killed


@pytest.mark.slow
def test_worker_killed_mid_stage_fails_in_one_line_and_a_rerun_recomputes_only_that_stage(tmp_path, prefect_server):
    import subprocess

    api = prefect_server["url"]
    endpoint, server = moto(tmp_path)
    workers, parent = [], None
    try:
        make_bucket(endpoint, "team")
        project = toy_project(tmp_path / "origin")
        s3_remote(project, endpoint, "team")
        commit(project)
        origin = machine(project, tmp_path / "a", api, S3_CREDENTIALS)
        gpu = machine(project, tmp_path / "gpu", api, S3_CREDENTIALS)
        cpu = machine(project, tmp_path / "cpu", api, S3_CREDENTIALS)
        setup_pools(cpu, within=45)
        workers = [gpu.worker("gpu"), cpu.worker("cpu")]

        # `make` (gpu pool) waits while `slow` exists in the gpu clone, long enough to kill that machine
        (gpu.root / "slow").write_text("1")
        parent = subprocess.Popen([sys.executable, "flows/distill.py", "--workers"], cwd=origin.root, env=origin.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while not (gpu.root / "started-make").exists():
            assert time.time() < deadline and parent.poll() is None, parent.communicate()
            time.sleep(0.5)
        assert _kill_processes_in(gpu.root) >= 2  # the gpu machine dies: its worker and the running stage
        out, err = parent.communicate(timeout=300)
        assert parent.returncode == 1, out[-2000:] + err[-2000:]
        line = [l for l in err.splitlines() if l.startswith("distill: error:")]
        assert len(line) == 1 and "stage make on pool gpu" in line[0] and "Crashed" in line[0], err[-3000:]

        # a gpu worker is back: base (done before the crash) is a hit, make and what follows it run
        (gpu.root / "slow").unlink()
        workers.append(gpu.worker("gpu"))
        assert report(origin.flow("--workers")) == {"base": "cached", "make": "computed", "total": "computed"}
        assert (gpu.root / "runs.log").read_text() == "make\n"
        assert (cpu.root / "runs.log").read_text() == "base\ntotal\n"
        assert report(origin.flow("--workers")) == {"base": "cached", "make": "cached", "total": "cached"}
    finally:
        if parent is not None and parent.poll() is None:
            parent.kill()
        for w in workers:
            stop(w)
        stop(server)
