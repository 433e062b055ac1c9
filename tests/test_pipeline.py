"""End to end through DVC in temporary git repos (slow, but run in CI)."""
import json
import re

import pytest
import yaml

from conftest import make_project, run, tiny_params, write_image_folder, write_params

ALL_STAGES = ["prepare", "teacher", "trajectories", "critic", "distill", "finetune", "evaluate"]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow
def test_repro_rerun_param_edit_and_experiments(tmp_path):
    project = make_project(tmp_path / "project", tiny_params())
    first = run(["dvc", "repro"], project)
    assert ran(first.stdout) == ALL_STAGES
    metrics = json.loads((project / "evaluate/metrics.json").read_text())
    assert {"teacher", "student@1", "data_floor", "speedup"} <= set(metrics)

    again = run(["dvc", "repro"], project)
    assert ran(again.stdout) == []

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["lr"] = 1e-4
    write_params(project, params)
    edited = run(["dvc", "repro"], project)
    assert ran(edited.stdout) == ["distill", "finetune", "evaluate"]

    shown = run(["dvc", "metrics", "show", "--json"], project)
    assert "speedup" in shown.stdout
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    for name in ("teacher loss", "critic losses", "distill generator losses", "distill critic losses",
                 "finetune generator losses"):
        values = plots[name][0]["content"]["data"]["values"]
        assert values and all("step" in row for row in values), name
    assert any(key.endswith("student_1.png") for key in plots)

    # The README's ablation recipe: queue an objective change, run the queue, read it in `dvc exp show`.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)

    run(["dvc", "exp", "run", "--queue", "-n", "dmd1", "-S", "distill.objective=dmd", "-S", "finetune.objective=dmd"],
        project)
    queued = run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], project)
    # The objective is a param of critic onward: prepare/teacher/trajectories come from the cache.
    assert ran(queued.stdout) == ["critic", "distill", "finetune", "evaluate"], queued.stdout[-2000:]

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    (dmd1,) = [exp for exp in experiments if exp.get("name") == "dmd1"]
    data = dmd1["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["distill"]["objective"] == "dmd"
    metrics = data["metrics"]["evaluate/metrics.json"]["data"]
    assert metrics["student@1"]["fid"] > 0 and metrics["teacher"]["nfe"] > 1


@pytest.mark.slow
def test_image_folder_28px_end_to_end(tmp_path):
    folder = write_image_folder(tmp_path / "digits28", per_class=12, size=28)
    params = tiny_params(**{"data.source": str(folder), "data.resolution": 28, "data.test_fraction": 0.25})
    project = make_project(tmp_path / "project", params)
    out = run(["dvc", "repro"], project)
    assert ran(out.stdout) == ALL_STAGES
    info = json.loads((project / "prepare/info.json").read_text())
    assert info["resolution"] == 28 and info["channels"] == 1 and info["class_names"] == ["class_0", "class_1", "class_2"]
    assert info["num_test"] == 9
    metrics = json.loads((project / "evaluate/metrics.json").read_text())
    assert metrics["student@1"]["nfe"] == 1
