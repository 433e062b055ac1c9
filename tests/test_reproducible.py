"""Reproducibility: two fresh clones with the same params give byte-identical outputs for every stage."""
import json
import subprocess

import pytest
import yaml

from conftest import env, make_project, tiny_params
from fewstep.pipeline.hashing import Hasher, manifest

TIMING_KEYS = {"latency_ms", "speedup"}  # evaluate/metrics.json: wall-clock measurements may differ


def repro_in_parallel(projects):
    """`dvc repro` in every project at once; output goes to a log file beside each project."""
    runs = []
    for project in projects:
        log = project.parent / f"{project.name}-repro.log"
        with open(log, "w") as out:
            runs.append((subprocess.Popen(["dvc", "repro"], cwd=project, env=env(), stdout=out,
                                          stderr=subprocess.STDOUT), log))
    for proc, log in runs:
        assert proc.wait() == 0, f"dvc repro failed:\n{log.read_text()[-3000:]}"


def without_timing(metrics):
    if isinstance(metrics, dict):
        return {k: without_timing(v) for k, v in metrics.items() if k not in TIMING_KEYS}
    return metrics


def lock_outs(project, skip):
    """dvc.lock's dependency and output hashes per stage, leaving out the paths in `skip`."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: {kind: [e for e in stage.get(kind, []) if e["path"] not in skip] for kind in ("deps", "outs")}
            for name, stage in stages.items()}


@pytest.mark.slow
def test_two_fresh_clones_give_identical_outputs(tmp_path):
    # One torch thread per clone: the two clones run side by side on the same cores.
    params = tiny_params(**{"run.num_threads": 1})
    projects = [make_project(tmp_path / name, params) for name in ("clone_a", "clone_b")]
    repro_in_parallel(projects)

    # Every `outs` path of every stage in dvc.yaml, hashed (xxh3-128) with the cache's own manifest().
    stages = yaml.safe_load((projects[0] / "dvc.yaml").read_text())["stages"]
    timed = {"evaluate/metrics.json"}  # latency: wall-clock
    outs = {name: [o for o in stage["outs"] if o not in timed] for name, stage in stages.items()}
    assert set(outs) == {"prepare", "teacher", "trajectories", "critic", "distill", "finetune", "evaluate"}
    a, b = ({name: manifest(paths, project, Hasher()) for name, paths in outs.items()} for project in projects)
    for name, files in a.items():
        assert files, f"{name}: no output files"
    differ = sorted(path for name in a for path in set(a[name]) | set(b[name]) if a[name].get(path) != b[name].get(path))
    assert not differ, f"outputs differ between the two clones: {differ}"

    # The metrics (the details and each model's headline) agree too, apart from wall-clock timings.
    for name in ["evaluate/metrics.json", *stages["evaluate"]["metrics"]]:
        name = name if isinstance(name, str) else next(iter(name))
        metrics = [json.loads((p / name).read_text()) for p in projects]
        assert without_timing(metrics[0]) == without_timing(metrics[1]), name
        timed.add(name)
    # And DVC's own record of every dependency and output agrees.
    assert lock_outs(projects[0], timed) == lock_outs(projects[1], timed)
