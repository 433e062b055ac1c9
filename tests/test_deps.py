"""Stage deps derived from the code: `fewstep deps` checks them, and DVC reruns exactly the stages that
import an edited file."""
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run
from fewstep.pipeline.deps import DepsError, check, closure, pipeline_files, stage_deps, write


def copy_repo(dest: Path) -> Path:
    """The repository's pipelines, stage scripts and library (no outputs), as a fresh git + DVC repo."""
    dest.mkdir(parents=True)
    for item in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / item, dest / item)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "encode", "trajectories", "critic", "distill",
                                    "finetune", "export", "evaluate", "tmp", "cache", "config.local", "dvc.lock",
                                    "prepare", "captions", "vae", "teacher", "judge", "inputs", "benchmark")
    for folder in ("stages", "fewstep", "flows", "pipelines"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    run(["git", "init", "-q"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    return dest


def test_every_pipeline_lists_exactly_the_code_its_stages_import():
    assert [p.relative_to(ROOT).as_posix() for p in pipeline_files(ROOT)][:1] == ["dvc.yaml"]
    # the default, the text-to-image pipelines' one dvc.yaml (the others link to it: listed once) and the mini
    # teachers' stages of the *-digits pipelines (one file, linked from sd15-digits and sd3-digits)
    assert [p.relative_to(ROOT).as_posix() for p in pipeline_files(ROOT)] == [
        "dvc.yaml", "pipelines/sdxl/dvc.yaml", "pipelines/sdxl-digits/mini/dvc.yaml"]
    for name in ("sd15", "sd3", "sdxl-digits", "sd15-digits", "sd3-digits"):
        assert (ROOT / f"pipelines/{name}/dvc.yaml").is_symlink()
    assert (ROOT / "pipelines/sd15-digits/mini/dvc.yaml").is_symlink() and (ROOT / "pipelines/sd3-digits/mini/dvc.yaml").is_symlink()
    assert check(ROOT) == []


def test_shared_training_stages_depend_on_their_familys_trainer_only():
    """stages/critic.py, distill.py and finetune.py serve every family; the trainer module named by the command
    (--trainer) brings its family's code into that pipeline's deps and nothing of the other family's."""
    default = {s.stage: set(s.expected) for s in stage_deps(ROOT / "dvc.yaml", ROOT)}
    sd = {s.stage: set(s.expected) for s in stage_deps(ROOT / "pipelines/sdxl/dvc.yaml", ROOT)}
    for stage in ("critic", "distill", "finetune"):
        assert {f"stages/{stage}.py", "fewstep/families/edm/edm_trainer.py", "fewstep/core/stage.py"} <= default[stage]
        assert not any(f.startswith("fewstep/families/t2i/") for f in default[stage]), stage
        assert {f"../../stages/{stage}.py", "../../fewstep/families/t2i/t2i_trainer.py", "../../fewstep/families/t2i/variants.py",
                "../../fewstep/families/t2i/flow_denoiser.py"} <= sd[stage], sd[stage]
    # the trajectories stage: its family's teacher-solve module, and no training code (a trainer edit does not
    # re-solve the teacher's ODE)
    assert {"stages/trajectories.py", "fewstep/families/edm/edm_trajectories.py", "fewstep/core/sampling.py"} <= default["trajectories"]
    assert {"../../stages/trajectories.py", "../../fewstep/families/t2i/t2i_trajectories.py"} <= sd["trajectories"]
    training = {"fewstep/core/training.py", "fewstep/core/distillation.py", "fewstep/families/edm/edm_trainer.py",
                "fewstep/families/t2i/t2i_trainer.py"}
    assert all((ROOT / f).is_file() for f in training)  # the names checked below are the tree's own
    for files in (default["trajectories"], sd["trajectories"]):
        files = {f.removeprefix("../../") for f in files}
        assert not training & files and not any("/objectives/" in f for f in files), files
    shared = {"trajectories.py", "critic.py", "distill.py", "finetune.py", "evaluate.py"}
    assert shared <= {p.name for p in (ROOT / "stages").glob("*.py")}
    assert not shared & {p.name for p in (ROOT / "stages/t2i").glob("*.py")}  # no family keeps a copy


def test_a_trainer_that_is_not_one_is_refused_in_one_line(tmp_path):
    proc = run([sys.executable, str(ROOT / "stages/distill.py"), "--trainer", str(ROOT / "fewstep/io.py"), "--help"],
               tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"--trainer {ROOT / 'fewstep/io.py'}: not a fewstep trainer module (expected fewstep/families/edm/edm_trainer.py or "
        "fewstep/families/t2i/t2i_trainer.py: a module with INPUTS, launch, train_stage)"], proc.stderr
    # a copy of the trainer is accepted while it is the file Python imports, byte for byte
    shutil.copytree(ROOT / "fewstep", tmp_path / "fewstep", ignore=shutil.ignore_patterns("__pycache__"))
    copy = tmp_path / "fewstep/families/edm/edm_trainer.py"
    assert run([sys.executable, str(ROOT / "stages/distill.py"), "--trainer", str(copy), "--help"], tmp_path).returncode == 0
    copy.write_text(copy.read_text() + "# edited\n")
    proc = run([sys.executable, str(ROOT / "stages/distill.py"), "--trainer", str(copy), "--help"], tmp_path, check=False)
    assert proc.returncode == 1 and "differs from the named file" in proc.stderr, proc.stderr


def test_a_family_module_refuses_another_familys_params_in_one_line(tmp_path):
    """One schema reads every pipeline's params; a stage whose module serves other families says so."""
    proc = run([sys.executable, str(ROOT / "stages/distill.py"), "--trainer", str(ROOT / "fewstep/families/edm/edm_trainer.py"),
                "--params", str(ROOT / "pipelines/sd3/params.yaml"), "--teacher", "t", "--prepare", "p", "--critic", "c",
                "--trajectories", "tr", "--out", "o"], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"[distill] error: {ROOT / 'pipelines/sd3/params.yaml'}: teacher.family is sd3, but this stage's module "
        "(named in its command) serves the edm family (a teacher trained from data)"), proc.stderr
    assert not (tmp_path / "o").exists()


def test_fine_grained_evaluation_code_is_not_a_dep_of_training():
    stages = {s.stage: set(s.expected) for s in stage_deps(ROOT / "dvc.yaml", ROOT)}
    for training in ("prepare", "teacher", "trajectories", "critic", "distill", "finetune"):
        assert not stages[training] & {"fewstep/core/metrics.py", "fewstep/core/evaluation.py", "fewstep/families/edm/edm_evaluation.py",
                                       "stages/evaluate.py"}, training
    assert {"fewstep/core/metrics.py", "fewstep/core/evaluation.py", "fewstep/families/edm/edm_evaluation.py"} <= stages["evaluate"]
    # the quality curves logged while training share their distances (FID, KID, pixel W1) with evaluate
    assert {"fewstep/families/edm/curves.py", "fewstep/core/distances.py"} <= stages["distill"] & stages["finetune"]
    assert "fewstep/core/distances.py" in stages["evaluate"]
    # the objective registry imports every objective module, so every objective is a dep of distill
    assert {f"fewstep/core/objectives/{m}.py" for m in ("dmd2", "dmd", "sid", "consistency", "base")} <= stages["distill"]


def test_check_names_the_stage_and_file_when_a_dep_is_removed_and_write_fixes_it(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    dvcfile = repo / "dvc.yaml"
    text = dvcfile.read_text()
    start = text.index("  distill:")
    entry = "      - fewstep/families/edm/unet.py\n"
    cut = text.index(entry, start)
    dvcfile.write_text(text[:cut] + text[cut + len(entry):])
    problems = check(repo)
    assert problems == ["dvc.yaml: stage distill: missing dep fewstep/families/edm/unet.py "
                        "(imported via fewstep/families/edm/edm_trainer.py -> fewstep/families/edm/unet.py)"]  # the trainer the command names
    proc = run(["fewstep", "deps", "--check"], repo, check=False)
    assert proc.returncode == 1 and proc.stdout.strip() == problems[0], proc.stdout + proc.stderr
    assert "fewstep deps --write" in proc.stderr

    # a dep nothing imports is reported too (an edit to it would rerun the stage for nothing)
    text = dvcfile.read_text()
    dvcfile.write_text(text.replace("      - stages/prepare.py\n", "      - stages/prepare.py\n      - fewstep/cli.py\n", 1))
    assert "dvc.yaml: stage prepare: dep fewstep/cli.py is not imported by the stage" in "\n".join(check(repo))

    assert write(repo) == ["dvc.yaml"]
    assert check(repo) == [] and run(["fewstep", "deps"], repo).returncode == 0
    assert "# The embedded default pipeline" in dvcfile.read_text()  # comments survive the rewrite


def test_closure_follows_relative_imports_packages_and_the_scripts_folder(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from . import leaf\n")
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text("from ..util import x\n")
    (tmp_path / "pkg" / "util.py").write_text("import json\nx = 1\n")
    (tmp_path / "pkg" / "unused.py").write_text("")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "helper.py").write_text("")
    (tmp_path / "scripts" / "main.py").write_text("import helper\n\ndef f():\n    from pkg.sub import leaf\n")
    files = closure("scripts/main.py", tmp_path).files
    assert sorted(files) == ["pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py", "pkg/util.py",
                             "scripts/helper.py", "scripts/main.py"]
    assert files["pkg/util.py"] == ["scripts/main.py", "pkg/sub/leaf.py", "pkg/util.py"]  # the chain a report names


def test_a_run_time_import_is_an_error_not_a_hole(tmp_path):
    (tmp_path / "main.py").write_text("import importlib\nmod = importlib.import_module('x' + 'y')\n")
    with pytest.raises(DepsError, match=r"main.py:2: imports a module by a run-time name"):
        closure("main.py", tmp_path)


def _projects(repo: Path) -> list[Path]:
    """The root DVC project and each pipeline's own (pipelines/<name>, `dvc init --subdir`)."""
    return [repo, *sorted(p.parent for p in (repo / "pipelines").glob("*/.dvc"))]


def _distinct_projects(repo: Path) -> list[Path]:
    """One project per distinct stage graph: projects whose dvc.yaml (and mini/dvc.yaml) hold the same bytes
    and whose params make the same stages (sd15, sd3 link sdxl's; sd15-digits, sd3-digits link sdxl-digits')
    flip the same stages for any edit, so their `dvc status` repeats the first one's."""
    seen, distinct = set(), []
    for project in _projects(repo):
        files = tuple((project / f).read_bytes() for f in ("dvc.yaml", "mini/dvc.yaml") if (project / f).exists())
        stages = tuple(sorted(_existing_stages_of(project)))
        if (files, stages) not in seen:
            seen.add((files, stages))
            distinct.append(project)
    return distinct


def _existing_stages_of(project: Path) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(project)) as dvc:
        return [stage.name for stage in dvc.index.stages]


def _status(repo: Path, projects: list[Path] | None = None) -> dict:
    from dvc.repo import Repo

    status = {}
    for project in projects or _projects(repo):
        with Repo(str(project)) as dvc:
            status |= dvc.status()
    # an `inputs` stage is always changed by design (it hashes optional inputs); what else changed counts
    status = {stage: [r for r in reasons if r != "always changed"] for stage, reasons in status.items()}
    return {stage: reasons for stage, reasons in status.items() if reasons}


def _placeholders(repo: Path) -> None:
    """Every output and external input of every pipeline as a small placeholder, committed to dvc.lock,
    so `dvc status` compares code hashes exactly as after a real run (no weights or training needed)."""
    for project in _projects(repo):
        _project_placeholders(project)


def _project_placeholders(repo: Path) -> None:
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        for stage in dvc.index.stages:
            for item in [*stage.deps, *stage.outs]:
                if type(item).__name__ == "ParamsDependency":
                    continue
                path = Path(item.fs_path)
                if not path.exists():
                    if item.def_path.endswith((".json", ".txt")):
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text("{}\n")
                    else:
                        path.mkdir(parents=True, exist_ok=True)
                        (path / "placeholder").write_text(item.def_path)
    run(["dvc", "commit", "-f", "-q"], repo)


def _existing_stages(repo: Path) -> set[str]:
    """Every stage DVC instantiates in every project, named as _stage_names names them."""
    from dvc.repo import Repo

    names = set()
    for project in _projects(repo):
        with Repo(str(project)) as dvc:
            for stage in dvc.index.stages:
                rel = Path(stage.path).resolve().relative_to(repo.resolve()).as_posix()
                names.add(stage.name.split("@")[0] if rel == "dvc.yaml" else f"{rel}:{stage.name.split('@')[0]}")
    return names


def _stage_names(status: dict, repo: Path) -> set[str]:
    """`dvc status` keys as "stage" (root dvc.yaml) or "pipelines/x/dvc.yaml:stage"."""
    names = set()
    for key in status:
        path, _, stage = key.rpartition(":")
        stage = stage.split("@")[0]  # a foreach stage's instance (judge@prepare) is its template's closure
        rel = Path(path).resolve().relative_to(repo.resolve()).as_posix() if path else "dvc.yaml"
        names.add(stage if rel == "dvc.yaml" else f"{rel}:{stage}")
    return names


@pytest.mark.slow
def test_an_edit_flips_exactly_the_stages_that_import_the_file(tmp_path, monkeypatch):
    repo = copy_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    _placeholders(repo)
    closures = {}  # "dvcfile:stage" -> root-relative files in its code closure
    for dvcfile in pipeline_files(repo):
        rel = dvcfile.relative_to(repo).as_posix()
        for s in stage_deps(dvcfile, repo):
            closures[s.stage if rel == "dvc.yaml" else f"{rel}:{s.stage}"] = set(s.chains)
    assert len(_projects(repo)) == 7  # the root, sd15, sd3, sdxl and their *-digits
    # a foreach template over an empty list (judge where judge.by is []) is no stage: nothing to flip
    existing = _existing_stages(repo)
    closures = {stage: files for stage, files in closures.items() if stage in existing}
    assert _status(repo) == {}, "placeholders not committed"
    code = sorted(p.relative_to(repo).as_posix() for folder in ("fewstep", "stages", "flows")
                  for p in (repo / folder).rglob("*.py"))
    projects = _distinct_projects(repo)
    names = [p.relative_to(repo).as_posix() for p in projects]
    assert names == [".", "pipelines/sd15", "pipelines/sd15-digits"]
    closures = {stage: files for stage, files in closures.items()
                if ":" not in stage or "/".join(stage.split("/")[:2]) in names}
    # Files imported by the same stages are edited together: `dvc status` flips a stage when any of its deps
    # changed, so the group's flips are the union of each file's, and a group that flips exactly the stages
    # importing it has no file flipping a stage that does not import it; that each file is a dep of every stage
    # importing it is test_every_pipeline_lists_exactly_the_code_its_stages_import's. One status per group rather
    # than per file: the same proof for a tenth of the `dvc status` runs.
    groups: dict[frozenset, list[str]] = {}
    for rel in code:
        groups.setdefault(frozenset(stage for stage, files in closures.items() if rel in files), []).append(rel)
    assert len(groups) >= 10 and frozenset() in groups  # files outside every closure exist (flows, cli, deps)
    mismatches = []
    for expected, files in groups.items():
        originals = {rel: (repo / rel).read_bytes() for rel in files}
        for rel, original in originals.items():
            (repo / rel).write_bytes(original + b"\n# edited\n")
        flipped = _stage_names(_status(repo, projects), repo)
        for rel, original in originals.items():
            (repo / rel).write_bytes(original)
        if flipped != expected:
            mismatches.append(f"{files}: flip {sorted(flipped)}, imported by {sorted(expected)}")
    assert not mismatches, "\n".join(mismatches)
