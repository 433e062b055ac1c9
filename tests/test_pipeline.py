"""End to end through DVC in temporary git repos (slow, but run in CI)."""
import json
import re

import pytest
import yaml

from conftest import CURVES, make_project, run, tiny_params, write_image_folder, write_params

ALL_STAGES = ["prepare", "teacher", "trajectories", "critic", "distill", "finetune", "evaluate"]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def assert_quiet_about_other_pipelines(project):
    """The SD pipelines (never set up here: no weights) are DVC projects of their own, so the root's DVC
    commands say nothing about them."""
    assert (project / "pipelines/sdxl/dvc.yaml").is_file()
    commands = {"status": ["dvc", "status"], "metrics": ["dvc", "metrics", "show"], "dag": ["dvc", "dag"],
                "plots": ["dvc", "plots", "show", "--json"], "checkout": ["dvc", "checkout"]}
    for name, cmd in commands.items():
        out = run(cmd, project)
        text = out.stdout + out.stderr
        assert "pipelines/" not in text and "WARNING" not in text and "ERROR" not in text, (name, text[-2000:])
    assert run(["dvc", "status"], project).stdout.strip() == "Data and pipelines are up to date."
    assert "failed" not in run(["dvc", "metrics", "show"], project).stdout
    assert max(map(len, run(["dvc", "dag"], project).stdout.splitlines())) < 200  # the default alone: 172 columns


def tree_digest(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_a_params_typo_keeps_the_outputs(project):
    """A params mistake stops the stage with one line, and DVC's deleted outputs come back unchanged."""
    before = tree_digest(project / "distill")
    good = (project / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["distill"]["lrr"] = 0.1
    write_params(project, params)
    failed = run(["dvc", "repro"], project, check=False)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert errors == ["[distill] error: params.yaml: distill.lrr is not a known key (did you mean lr? valid keys: "
                      + errors[0].split(" valid keys: ")[1]], failed.stderr[-2000:]
    assert "Traceback" not in failed.stdout + failed.stderr
    assert tree_digest(project / "distill") == before
    (project / "params.yaml").write_text(good)
    assert ran(run(["dvc", "repro"], project).stdout) == []  # the outputs are the lock's: nothing to redo


def foreign(lock: str) -> str:
    """dvc.lock as another machine type commits it: the same deps and params, other output hashes (float bits)."""
    entries = yaml.safe_load(lock)["stages"]
    produced = {out["md5"] for stage in entries.values() for out in stage.get("outs", [])}
    for md5 in produced:
        lock = lock.replace(md5, f"{int(md5.split('.')[0], 16) ^ 1:032x}" + md5[32:])
    return lock


def assert_the_way_back_keeps_this_machines_outputs(project):
    """The README's way back on a clone whose committed dvc.lock came from another machine type: after an
    experiment in the workspace, `git restore . && fewstep checkout` brings back the outputs this machine
    computed, from its caches, computing nothing and deleting nothing."""
    outputs = ALL_STAGES[:-1] + ["evaluate/samples"]
    before = {name: tree_digest(project / name) for name in outputs}
    metrics = (project / "evaluate/metrics.json").read_text()
    mine = (project / "dvc.lock").read_text()
    (project / "dvc.lock").write_text(foreign(mine))
    run(["git", "commit", "-qam", "dvc.lock from a machine of another CPU type"], project)
    (project / "dvc.lock").write_text(mine)  # this machine's first run: `git status` shows dvc.lock modified

    experiment = run(["dvc", "exp", "run", "-S", "distill.lr=0.0003"], project)  # in the workspace
    assert ran(experiment.stdout) == ["distill", "finetune", "evaluate"], experiment.stdout[-2000:]
    run(["git", "restore", "."], project)
    back = run(["fewstep", "checkout"], project)
    lines = back.stdout.splitlines()
    stages, note = lines[:-2], lines[-2:]
    assert sorted(line.split(":")[0] for line in stages) == sorted(ALL_STAGES), back.stdout
    assert stages[0].startswith("prepare:") and stages[-1].startswith("evaluate:"), back.stdout  # upstream first
    assert all("DVC's run-cache" in line for line in stages) and "Commit it" in note[1], back.stdout
    assert max(len(line) for line in lines) <= 160, back.stdout
    assert {name: tree_digest(project / name) for name in outputs} == before
    assert (project / "evaluate/metrics.json").read_text() == metrics
    assert run(["dvc", "status"], project).stdout.strip() == "Data and pipelines are up to date."
    assert ran(run(["dvc", "repro"], project).stdout) == []
    assert yaml.safe_load((project / "dvc.lock").read_text()) == yaml.safe_load(mine)

    # `dvc checkout` alone fails there (dvc.lock's objects are not here); fewstep checkout never deletes
    run(["git", "restore", "."], project)
    assert "Checkout failed" in run(["dvc", "checkout"], project, check=False).stderr
    back = run(["fewstep", "checkout"], project)
    assert {name: tree_digest(project / name) for name in outputs} == before, back.stdout


@pytest.mark.slow
def test_newcomer_repro_rerun_param_edit_experiments_and_the_way_back(tmp_path):
    project = make_project(tmp_path / "project", tiny_params(**CURVES))
    first = run(["dvc", "repro"], project)
    assert ran(first.stdout) == ALL_STAGES
    metrics = json.loads((project / "evaluate/metrics.json").read_text())
    assert {"teacher", "student@1", "floor", "speedup"} <= set(metrics)

    again = run(["dvc", "repro"], project)
    assert ran(again.stdout) == []
    assert_quiet_about_other_pipelines(project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["lr"] = 1e-4
    write_params(project, params)
    edited = run(["dvc", "repro"], project)
    assert ran(edited.stdout) == ["distill", "finetune", "evaluate"]

    shown = run(["dvc", "metrics", "show", "--json"], project)
    assert "speedup" in shown.stdout
    assert_a_params_typo_keeps_the_outputs(project)
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    for name in ("teacher loss", "critic losses", "distill generator losses", "distill critic losses",
                 "finetune generator losses", "quality during training, FID on 500 samples (x = the stage's step)",
                 "fidelity to the teacher during training, KID-T",
                 "pixel statistics during training, W1 to held-out images"):
        values = plots[name][0]["content"]["data"]["values"]
        assert values and all("step" in row for row in values), name
    assert any(key.endswith("student_1.png") for key in plots)
    page = run(["fewstep", "plots"], project)  # the offline page: every chart an inline SVG, no script at all
    html = (project / "dvc_plots/offline.html").read_text()
    assert "10 plots" in page.stdout and html.count("<svg") == 8 and html.count("<img") == 2 and "<script" not in html
    assert "labelLimit" in json.dumps(plots)  # .dvc/plots/linear.json: legends below the chart, never clipped

    # The README's ablation recipe: queue an objective change, run the queue, read it in `dvc exp show`.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)

    run(["dvc", "exp", "run", "--queue", "-n", "dmd1", "-S", "distill.objective=dmd"],
        project)
    workspace = (project / "params.yaml").read_text()
    queued = run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], project)
    noise = [l for l in (queued.stdout + queued.stderr).splitlines() if "pipelines/" in l or "No file hash" in l]
    assert not noise, noise[:5]
    assert (project / "params.yaml").read_text() == workspace  # a queued experiment leaves the workspace alone
    # The objective is a param of critic onward: prepare/teacher/trajectories come from the cache.
    assert ran(queued.stdout) == ["critic", "distill", "finetune", "evaluate"], queued.stdout[-2000:]

    table = run(["dvc", "exp", "show", "--only-changed", "--drop", "[^.]*$|.*/", "--keep", r"Experiment|.*/(student|teacher)\.json:fid$"],
                project).stdout  # README's narrow view
    assert "dmd1" in table and "distill.objective" in table and "student.json:fid" in table, table
    assert max(map(len, table.splitlines())) <= 160, table
    shown = run(["dvc", "metrics", "show"], project).stdout  # the headline: one row per model
    assert max(map(len, shown.splitlines())) <= 160 and len(shown.splitlines()) == 5, shown  # + the floor
    # README's way in and back: apply the experiment, then return to the committed baseline
    baseline = tree_digest(project / "finetune")
    run(["dvc", "exp", "apply", "dmd1"], project)
    assert yaml.safe_load((project / "params.yaml").read_text())["distill"]["objective"] == "dmd"
    assert tree_digest(project / "finetune") != baseline
    run(["git", "restore", "."], project)
    run(["fewstep", "checkout"], project)
    assert tree_digest(project / "finetune") == baseline
    assert run(["dvc", "status"], project).stdout.strip() == "Data and pipelines are up to date."
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    (dmd1,) = [exp for exp in experiments if exp.get("name") == "dmd1"]
    data = dmd1["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["distill"]["objective"] == "dmd"
    metrics = data["metrics"]
    assert metrics["evaluate/headline/student.json"]["data"]["fid"] > 0
    assert metrics["evaluate/headline/teacher.json"]["data"]["nfe"] > 1
    assert_the_way_back_keeps_this_machines_outputs(project)


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
