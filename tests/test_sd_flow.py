"""`prefect deployment run distill/sd3` (and distill/sdxl without weights) on a local Prefect server."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_fixtures import assets, project_env, sdxl_project  # noqa: F401 (assets: fixture)

STAGES = ["encode", "trajectories", "critic", "distill", "finetune", "export", "evaluate"]


def _serve(project, env, log_path):
    """flows/serve.py in the background, once its deployments are registered."""
    prefect = str(Path(sys.executable).parent / "prefect")
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "flows/serve.py"], cwd=project, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while subprocess.run([prefect, "deployment", "inspect", "distill/sdxl"], env=env, capture_output=True).returncode:
        assert server.poll() is None and time.time() < deadline, Path(log_path).read_text()[-3000:]
        time.sleep(1)
    return server, log


@pytest.mark.slow
def test_sdxl_deployment_without_weights_fails_in_one_line(tmp_path, prefect_server, assets):
    """The normal first try: no SDXL weights. The run's state and log say which path is missing, which
    params key sets it and where the README explains it; no traceback anywhere."""
    import shutil

    project = sdxl_project(tmp_path, assets)
    shutil.rmtree(project / "models")
    e = project_env(project) | {"FEWSTEP_CACHE_DIR": str(tmp_path / "cache"), "PREFECT_API_URL": prefect_server["url"]}
    prefect = str(Path(sys.executable).parent / "prefect")
    server, log = _serve(project, e, tmp_path / "serve.log")
    try:
        proc = subprocess.run([prefect, "deployment", "run", "distill/sdxl", "--watch"], env=e,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    line = ("models/tiny-sdxl not found: stage encode reads it (set by teacher.path in pipelines/sdxl/params.yaml); "
            'how to get it: pipelines/README.md, "Inputs"')
    watched = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert proc.returncode == 1 and line in watched, watched[-3000:]
    served = (tmp_path / "serve.log").read_text()
    assert line in served and "Traceback" not in served, served[-3000:]
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", watched)
    assert run_id, watched[:2000]
    if run_id:  # the run's state message itself (what the UI and `flow-run inspect` show)
        state = subprocess.run([prefect, "flow-run", "inspect", run_id.group(1)], env=e, capture_output=True, text=True)
        assert line.split(";")[0] in " ".join(state.stdout.split()), state.stdout[-2000:]


@pytest.mark.slow
def test_served_sd3_deployment_run_completes(tmp_path, prefect_server, assets):
    """`prefect deployment run distill/sd3` against a real local server: every stage computed, the exported
    pipeline and the evaluation (CLIP score configured) written. The flow and its deployments are the same for
    every pipeline (a `pipeline` parameter); SDXL's pipeline runs through DVC in test_sd_pipeline, and the SDXL
    deployment's one-line failure without weights is tested above."""
    name = "sd3"
    project = sdxl_project(tmp_path, assets, name)
    e = project_env(project) | {"FEWSTEP_CACHE_DIR": str(tmp_path / "cache"), "PREFECT_API_URL": prefect_server["url"]}
    prefect = str(Path(sys.executable).parent / "prefect")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "flows/serve.py"], cwd=project, env=e, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while subprocess.run([prefect, "deployment", "inspect", f"distill/{name}"], env=e,
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        proc = subprocess.run([prefect, "deployment", "run", f"distill/{name}", "--watch"], env=e,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
        artifact = subprocess.run([prefect, "artifact", "inspect", "evaluation"], env=e, capture_output=True, text=True)
        assert "| student |" in artifact.stdout and "clip_score" in artifact.stdout, artifact.stdout[-2000:]
        assert "clip_score: skipped" not in artifact.stdout, artifact.stdout[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    served = (tmp_path / "serve.log").read_text()
    for stage in STAGES:
        assert f"{stage}: computed" in served, (stage, served[-3000:])
    assert (project / f"pipelines/{name}/export/model_index.json").is_file()
    assert (project / f"pipelines/{name}/evaluate/metrics.json").is_file()
