"""`prefect deployment run distill/sdxl` (and distill/sd15) against a local Prefect server, on tiny teachers."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_fixtures import assets, make_sd_project, project_env, sd_params, sdxl_project  # noqa: F401 (assets: fixture)

STAGES = ["encode", "trajectories", "critic", "distill", "finetune", "export", "evaluate"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_served_sd_deployment_run_completes(name, tmp_path, prefect_server, assets):
    if name == "sdxl":
        project = sdxl_project(tmp_path, assets)
    else:
        project = make_sd_project(tmp_path / "project", "sd15", sd_params("sd15"), assets["sd15"], assets["text"])
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
        expected = "clip_score" if name == "sdxl" else "clip_score: skipped"
        assert "| student |" in artifact.stdout and expected in artifact.stdout, artifact.stdout[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    served = (tmp_path / "serve.log").read_text()
    for stage in STAGES:
        assert f"{stage}: computed" in served, (stage, served[-3000:])
    assert (project / f"pipelines/{name}/export/model_index.json").is_file()
    assert (project / f"pipelines/{name}/evaluate/metrics.json").is_file()
