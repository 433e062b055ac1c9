import contextlib
import os

# Tests run tiny models, often several processes side by side (clones, ranks, servers): one thread per
# process avoids OpenMP threads spinning against each other on a 2-core machine (up to 10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tiny but complete: every stage runs its real code path in seconds.
TINY = {
    "seed": 0,
    "featurizer": {"steps": 20, "batch_size": 32},
    "teacher": {"steps": 8, "batch_size": 16},
    "trajectories": {"num_samples": 40, "sampling_steps": 3, "batch_size": 16, "shard_size": 25},
    "critic": {"steps": 2, "batch_size": 8},
    "distill": {"steps": 3, "batch_size": 8, "dmd2": {"ttur": 2}, "log_every": 2, "eval_every": 0},
    "finetune": {"steps": 2, "batch_size": 8, "dmd2": {"ttur": 1}, "eval_every": 0},
    "evaluate": {"batch_size": 20, "grid_size": 4},
}
# The quality curves while training (params.yaml's eval_every), for the tests that check them: a second a stage
# that the other tiny runs skip.
CURVES = {"distill.eval_every": 50, "finetune.eval_every": 20}


EDM_TRAINER = str(ROOT / "fewstep/families/edm/edm_trainer.py")  # the shared training stages' --trainer for this family
EDM_SOLVES = str(ROOT / "fewstep/families/edm/edm_trajectories.py")  # the trajectories stage's --family for this family
EDM_EVALUATION = str(ROOT / "fewstep/families/edm/edm_evaluation.py")  # the evaluate stage's --family for this family

# Each stage script's arguments in a project laid out like dvc.yaml's (for running stages one by one).
STAGE_ARGS = {
    "prepare": ["--out", "prepare"],
    "teacher": ["--prepare", "prepare", "--out", "teacher"],
    "trajectories": ["--family", EDM_SOLVES, "--teacher", "teacher/model", "--out", "trajectories"],
    "critic": ["--trainer", EDM_TRAINER, "--teacher", "teacher/model", "--prepare", "prepare", "--out", "critic"],
    "distill": ["--trainer", EDM_TRAINER, "--teacher", "teacher/model", "--prepare", "prepare", "--critic",
                "critic/critic", "--trajectories", "trajectories", "--out", "distill"],
    "finetune": ["--trainer", EDM_TRAINER, "--teacher", "teacher/model", "--prepare", "prepare", "--distilled",
                 "distill", "--trajectories", "trajectories", "--out", "finetune"],
    "evaluate": ["--family", EDM_EVALUATION, "--prepare", "prepare", "--teacher", "teacher/model", "--trajectories", "trajectories",
                 "--student", "finetune/student", "--samples", "evaluate/samples", "--metrics", "evaluate/metrics.json"],
}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return base


def tiny_params(**overrides) -> dict:
    """The project's params.yaml with every section shrunk to seconds, plus dotted-key overrides."""
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(yaml.safe_dump(TINY)))
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return params


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    # Subprocesses import this checkout's `fewstep`, not whichever one the venv was installed from.
    e["PYTHONPATH"] = os.pathsep.join(p for p in (e.get("PYTHONPATH"), str(ROOT)) if p)
    e.setdefault("PYTHONHASHSEED", "0")
    return e


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage_script(stage: str) -> Path:
    """The default pipeline's stage script: a shared one (stages/<stage>.py) or the EDM family's own (stages/edm/)."""
    script = ROOT / "stages" / f"{stage}.py"
    return script if script.is_file() else ROOT / "stages" / "edm" / f"{stage}.py"


def run_stage(stage: str, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, str(stage_script(stage)), "--params", "params.yaml", *args], cwd, check)


def undeclared_reads(reads_dir: Path, *dvcfiles: Path) -> dict[str, list[str]]:
    """Per stage that ran with FEWSTEP_PARAMS_READS=reads_dir: the params keys it read that its dvc.yaml entry
    (in any of `dvcfiles`) does not list (a change to one would not rerun the stage: a stale result). Also checks
    every stage ran (a foreach stage only where its list is not empty, i.e. where it ran)."""
    import json

    entries = {name: stage for dvcfile in dvcfiles for name, stage in yaml.safe_load(dvcfile.read_text())["stages"].items()}
    reads = {file.stem: json.loads(file.read_text()) for file in reads_dir.glob("*.json")}
    stages = {name: stage.get("do", stage) for name, stage in entries.items()
              if "foreach" not in stage or name in reads}
    assert set(reads) == set(stages), f"stages without a record of their reads: {set(stages) ^ set(reads)}"
    missing = {}
    for stage, keys in reads.items():
        declared = [key for entry in stages[stage].get("params", [])
                    for key in ([entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks])]
        unlisted = [key for key in keys if not any(key == d or key.startswith(d + ".") for d in declared)]
        if unlisted:
            missing[stage] = unlisted
    return missing


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def make_project(folder: Path, params: dict) -> Path:
    """A fresh git + DVC repo holding the pipeline (dvc.yaml, stages, library) with the given params."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in ("dvc.yaml", ".gitignore", ".dvcignore", "prefect.yaml"):
        shutil.copy(ROOT / item, folder / item)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "stages", folder / "stages", ignore=ignore)
    shutil.copytree(ROOT / "flows", folder / "flows", ignore=ignore)
    shutil.copytree(ROOT / "fewstep", folder / "fewstep", ignore=ignore)
    # the other pipelines, as a clone has them (each its own DVC project), without anything run there
    shutil.copytree(ROOT / "pipelines", folder / "pipelines", ignore=shutil.ignore_patterns(
        "__pycache__", "tmp", "cache", "config.local", "dvc.lock", "encode", "trajectories", "critic", "distill",
        "finetune", "export", "evaluate", "prepare", "captions", "vae", "teacher", "judge", "inputs", "benchmark"))
    write_params(folder, params)
    run(["git", "init", "-q"], folder)
    run(["git", "config", "user.email", "t@example.com"], folder)
    run(["git", "config", "user.name", "test"], folder)
    run(["dvc", "init", "-q"], folder)
    run(["dvc", "config", "core.analytics", "false"], folder)
    shutil.copytree(ROOT / ".dvc/plots", folder / ".dvc/plots")  # the project's plot template, as a clone has it
    run(["git", "add", "-A"], folder)
    run(["git", "commit", "-qm", "init"], folder)
    return folder


def write_image_folder(folder: Path, per_class: int = 12, size: int = 28) -> Path:
    """28x28 grayscale digit images (MNIST-like, upscaled scikit-learn digits), one sub-folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(3):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        images = digits.images[digits.target == label][:per_class]
        for i, img in enumerate(images):
            pixels = (img / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(folder / f"class_{label}" / f"{i}.png")
    return folder


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_prefect_server(home: Path):
    """A real local Prefect server in `home`, as the API of this process while it runs; yields its URL."""
    import time
    import urllib.request

    port = _free_port()
    server_env = env() | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                          "PREFECT_SERVER_UI_ENABLED": "false",
                          # as README's Prefect section sets up: `--watch` then shows a run's log lines
                          "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
                          "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
                          # a dead holder's lease is found within 2 s of expiring, and a waiter asks again
                          # within 5 s (production: 15 s and 30 s): the lease tests wait less
                          "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
                          "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "5"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=server_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("Prefect server did not start:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real local Prefect server for the flow and deployment tests; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    with started_prefect_server(home) as url:
        yield {"url": url, "home": home}


@pytest.fixture(scope="module")
def own_prefect_server(tmp_path_factory):
    """A Prefect server for one test file alone: its deployments and work pools (flows/setup.sh registers the
    names the served deployment tests use too) never meet another file's on a shared xdist worker."""
    home = tmp_path_factory.mktemp("prefect-home-own")
    with started_prefect_server(home) as url:
        yield {"url": url, "home": home}



# The longest files first (pyproject's --no-loadscope-reorder keeps this order). The suite runs whole files per
# worker (--dist loadfile); a long file sent out last runs alone at the end while the other worker sits idle.
# Roughly by their tests' summed durations in a fresh clone's run (pytest --durations):
LONGEST_FIRST = ["test_team_workers.py", "test_pipeline.py", "test_flow.py", "test_digits_minis.py",
                 "test_sd_pipeline.py", "test_team.py", "test_fsdp.py", "test_sd_flow.py", "test_stages.py",
                 "test_reproducible.py", "test_deps.py", "test_resume.py", "test_parallel.py", "test_sd3.py",
                 "test_projects.py", "test_newcomer.py", "test_bad_input.py"]  # then the quick unit tests


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
