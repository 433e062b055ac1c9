"""What a newcomer trips over first: error lines that say everything once, a Ctrl-C that is one line, a
text-to-image pipeline without weights that says which key and where to get them, under plain DVC too."""
import copy
import os
import signal
import subprocess
import time

import pytest
import yaml

from conftest import ROOT, env, make_project, run, tiny_params
from fewstep.params import ParamsError, validate

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def problem(**edits) -> str:
    raw = copy.deepcopy(PARAMS)
    for dotted, value in edits.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    with pytest.raises(ParamsError) as err:
        validate(raw)
    return str(err.value)


def test_newcomer_params_errors_name_each_problem_once():
    # finetune inherits distill's keys: a typo under distill is one problem, not "(and 1 more problem)"
    typo = problem(**{"distill.lrr": 0.1})
    assert typo.startswith("distill.lrr is not a known key (did you mean lr? valid keys: lr, betas,") and "more problem" not in typo
    assert "finetune" not in typo and "also" not in typo
    # two real problems: both named, on one line
    two = problem(**{"distill.lrr": 0.1, "critic.steps": -1})
    assert two == "critic.steps must be > 0, got -1; also distill.lrr is not a known key", two
    # a word where a number belongs is not "a quoted number"
    assert problem(**{"distill.lr": "fast"}) == "distill.lr must be a number, got 'fast'"
    assert problem(**{"distill.lr": "1e-4"}) == ("distill.lr must be a number, got '1e-4' (a quoted string: write "
                                                "the number without quotes)")


@pytest.mark.slow
def test_newcomer_ctrl_c_is_one_line_and_keeps_the_previous_outputs(tmp_path):
    """Ctrl-C while a stage trains: the stage says it was interrupted in one line, no traceback, and the
    outputs DVC deleted before the run are back."""
    project = make_project(tmp_path / "p", tiny_params())
    run(["dvc", "repro", "teacher"], project)
    before = {p.relative_to(project): p.read_bytes() for p in (project / "teacher").rglob("*") if p.is_file()}
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**{"teacher.steps": 100000})))
    log = tmp_path / "repro.log"
    # As from a terminal: SIGINT at its default (a shell's background job, as CI may be, starts with it ignored)
    terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    with log.open("w") as sink:
        proc = subprocess.Popen(["dvc", "repro", "teacher"], cwd=project, env=env(), stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=terminal)
        try:
            deadline = time.time() + 300
            while "[teacher] device=" not in log.read_text() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)
            time.sleep(5)  # into the training loop
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
            proc.wait(timeout=120)
        finally:  # never leave the 100000-step teacher behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    after = text.split("[teacher] device=")[1].splitlines()[1:]
    assert "Traceback" not in text, text[-3000:]
    (said,) = [i for i, line in enumerate(after) if line.startswith("[teacher] interrupted after")]
    assert "kept the previous outputs (teacher)" in after[said], after[said]
    rest = [line for line in after[said + 1:] if line.strip()]
    assert len(rest) <= 2 and all(line.startswith("ERROR: ") for line in rest), after  # DVC's own, if any
    assert {p.relative_to(project): p.read_bytes() for p in (project / "teacher").rglob("*") if p.is_file()} == before


def test_newcomer_text_to_image_pipeline_without_weights_under_plain_dvc(tmp_path):
    """`dvc repro` in pipelines/sdxl before the weights are there: the inputs stage, which DVC runs first, says
    the flow's line (the path, the key, where to read how to get it); nothing is left behind."""
    project = make_project(tmp_path / "p", tiny_params())
    folder = project / "pipelines/sdxl"
    proc = run(["dvc", "repro"], folder, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors[0] == ("[inputs] error: models/stable-diffusion-xl-base-1.0 not found: stage encode reads it (set "
                         "by teacher.path in pipelines/sdxl/params.yaml); how to get it: pipelines/README.md, "
                         "\"Inputs\""), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "No such file" not in proc.stderr
    assert run(["git", "status", "--porcelain"], project).stdout == ""  # no dvc.lock, no output left behind
