"""The Prefect flow over the DVC graph: caching, param edits, corruption, concurrency, team sharing."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import env, make_project, run, tiny_params

STAGES = ["prepare", "teacher", "trajectories", "critic", "distill", "finetune", "evaluate"]


def flow(project, cache, *args, check=True):
    e = env() | {"FEWSTEP_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "flows/distill.py", *args], cwd=project, env=e,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"flow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


def report(proc) -> dict:
    text = proc.stdout
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


@pytest.fixture(scope="module")
def computed(tmp_path_factory, prefect_server):
    """The tiny default, computed once through the flow: (project, its private store, the flow's report).
    Tests work on copies (`copy_of`)."""
    folder = tmp_path_factory.mktemp("computed")
    project, cache = make_project(folder / "project", tiny_params()), folder / "cache"
    return project, cache, report(flow(project, cache))


def copy_of(computed, dest):
    """A copy of the computed project and its store (DVC's cache copies its files: no link into the original)."""
    project, cache, _ = computed
    shutil.copytree(project, dest / "project", symlinks=True)
    shutil.copytree(cache, dest / "cache", symlinks=True)
    return dest / "project", dest / "cache"


@pytest.mark.slow
def test_cached_rerun_param_edit_and_corruption(tmp_path, computed):
    assert computed[2] == {s: "computed" for s in STAGES}
    project, cache = copy_of(computed, tmp_path)
    assert report(flow(project, cache)) == {s: "cached" for s in STAGES}

    edited = report(flow(project, cache, "--set", "distill.lr=0.0001"))
    assert [s for s, how in edited.items() if how == "computed"] == ["distill", "finetune", "evaluate"]

    # flip one byte of a cached output: detected, named, and never used
    target = project / "teacher/model/unet/diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    proc = flow(project, cache)
    states = report(proc)
    assert states["teacher"] in ("restored", "recomputed")
    assert "teacher/model/unet/diffusion_pytorch_model.safetensors" in proc.stdout + proc.stderr
    assert target.read_bytes() != bytes(data)


@pytest.mark.slow
def test_unknown_pipeline_is_one_clear_line(tmp_path, prefect_server):
    project = make_project(tmp_path / "project", tiny_params())
    proc = flow(project, tmp_path / "cache", "--pipeline", "sdlx", check=False)
    assert proc.returncode == 1
    assert ("distill: error: pipeline 'sdlx' does not exist yet: no pipelines/sdlx/dvc.yaml "
            "(available: default, sd15, sd15-digits, sd3, sd3-digits, sdxl, sdxl-digits)") in proc.stderr
    # a pipeline that exists but whose teacher weights were never downloaded: the path, its key, the guide
    proc = flow(project, tmp_path / "cache", "--pipeline", "sdxl", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert ("distill: error: models/stable-diffusion-xl-base-1.0 not found: stage encode reads it (set by "
            'teacher.path in pipelines/sdxl/params.yaml); how to get it: pipelines/README.md, "Inputs"') in proc.stderr


@pytest.mark.slow
def test_two_concurrent_runs_compute_each_stage_once(tmp_path, prefect_server):
    project = make_project(tmp_path / "project", tiny_params())
    cache = tmp_path / "cache"
    e = env() | {"FEWSTEP_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "flows/distill.py"], cwd=project, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out[out.index("{"):out.rindex("}") + 1]) for out, _ in outs]
    for stage in STAGES:
        assert sorted(r[stage] for r in reports) == ["cached", "computed"], (stage, reports)


@pytest.mark.slow
def test_served_deployment_run_completes_with_metrics_artifact(tmp_path, prefect_server, computed):
    """`flows/serve.py` serves the deployments; a run of distill/digits completes and leaves the evaluation
    artifact. (On a copy of the computed project: the stages' own runs are the other tests'; a served run that
    computes is tests/test_sd_flow.py's.)"""
    import time

    project, cache = copy_of(computed, tmp_path)
    (project / "evaluate/metrics.json").unlink()  # brought back by the run
    e = env() | {"FEWSTEP_CACHE_DIR": str(cache), "PREFECT_API_URL": prefect_server["url"]}
    prefect = str(__import__("pathlib").Path(sys.executable).parent / "prefect")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "flows/serve.py"], cwd=project, env=e, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while subprocess.run([prefect, "deployment", "inspect", "distill/digits"], env=e,
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        proc = subprocess.run([prefect, "deployment", "run", "distill/digits", "--watch"], env=e,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (project / "evaluate/metrics.json").is_file()
        artifacts = subprocess.run([prefect, "artifact", "inspect", "evaluation"], env=e, capture_output=True, text=True)
        assert artifacts.returncode == 0 and "| student@1 |" in artifacts.stdout, artifacts.stdout[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_team_shares_outputs_and_keys_through_a_local_dvc_remote(tmp_path, prefect_server):
    """Clone A computes and pushes to a folder remote; the flow's keys live beside DVC's objects there.
    Clone B: plain DVC restores everything, and the flow finds every stage a verified hit. (The toy pipeline:
    the store is what is tested, and its stages take seconds.)"""
    from team import toy_project

    a = toy_project(tmp_path / "a")
    toy = ["base", "make", "total"]
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "team", str(remote)], a)
    e = env() | {"FEWSTEP_CACHE_DIR": ""}
    first = subprocess.run([sys.executable, "flows/distill.py"], cwd=a, env=e, capture_output=True, text=True)
    assert report(first) == {s: "computed" for s in toy}, first.stderr[-3000:]
    assert len(list((remote / "fewstep" / "keys").iterdir())) == len(toy)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "pipeline results"], a)

    b = tmp_path / "b"
    run(["git", "clone", "-q", str(a), str(b)], tmp_path)
    run(["dvc", "pull"], b)
    assert "Running stage" not in run(["dvc", "repro"], b).stdout
    shared = subprocess.run([sys.executable, "flows/distill.py", "--fetch", "all"], cwd=b, env=e,
                            capture_output=True, text=True)
    assert report(shared) == {s: "cached" for s in toy}, shared.stderr[-3000:]
    # an empty private cache instead of the team's: DVC finds every stage current, none recomputed
    assert report(flow(b, tmp_path / "cache-b")) == {s: "up-to-date" for s in toy}
    assert not (b / "runs.log").exists()
