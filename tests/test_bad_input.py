"""Bad params and inputs: each fails with one clear line naming the key or file."""
import pytest
import yaml

from conftest import run_stage, tiny_params, write_params
from fewstep.params import ParamsError, load, validate

CASES = [
    ({"distill": {"lr": -1}}, "distill.lr must be > 0, got -1"),
    ({"distill": {"lr": "fast"}}, "distill.lr must be a number, got 'fast'"),
    ({"distill": {"objective": "gan"}}, "distill.objective must be one of 'dmd2', 'dmd', 'sid' or 'consistency', got 'gan'"),
    ({"distill": {"learning_rate": 0.1}}, "distill.learning_rate is not a known key (valid keys: "),
    ({"distill": {"steps": 2.5}}, "distill.steps must be an integer, got 2.5"),
    ({"distill": {"steps": 0}}, "distill.steps must be > 0, got 0"),
    ({"distill": {"student_sigmas": [1.0, 80.0]}}, "distill.student_sigmas must be a non-empty, strictly decreasing"),
    ({"distill": {"student_steps": 3}}, "distill.student_steps must be 1, 2 or 4, got 3"),
    ({"distill": {"student_steps": 4, "student_sigmas": [80.0, 1.0]}},
     "distill student_sigmas must have student_steps (4) entries, got 2"),
    ({"distill": {"dmd2": {"ttur": 0}}}, "distill.dmd2.ttur must be > 0, got 0"),
    ({"distill": {"t_min": 0.9, "t_max": 0.5}}, "distill t_min must be < t_max, got 0.9 >= 0.5"),
    ({"distill": {"betas": [0.9, 1.5]}}, "distill.betas must be two numbers in [0, 1), got [0.9, 1.5]"),
    ({"distill": {"dmd2": {"gan": {"critic_weight": -0.1}}}}, "distill.dmd2.gan.critic_weight must be >= 0, got -0.1"),
    ({"teacher": {"edm": {"sigma_min": 100}}}, "teacher.edm sigma_min must be < sigma_max, got 100.0 >= 80.0"),
    ({"teacher": {"channels": [32, 60]}}, "teacher.channels must be a non-empty list of positive multiples of 8"),
    ({"teacher": {"ema_decay": 1.0}}, "teacher.ema_decay must be < 1, got 1.0"),
    ({"data": {"resolution": 2}}, "data.resolution must be >= 4, got 2"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction must be < 1, got 1.5"),
    ({"seed": -3}, "seed must be >= 0, got -3"),
    ({"run": {"device": "tpu"}}, "run.device must be one of 'cpu', 'cuda' or 'auto', got 'tpu'"),
    ({"trajectories": {"num_samples": None}}, "trajectories.num_samples must be an integer, got None"),
    ({"evaluate": "fast"}, "evaluate must be a mapping of keys, got 'fast'"),
    ({"distil": {"lr": 1}}, "distil is not a known key (valid keys: seed, run, data,"),
]


@pytest.mark.parametrize("raw,message", CASES, ids=[m.split(" ")[0] for _, m in CASES])
def test_bad_params_one_line(raw, message):
    with pytest.raises(ParamsError) as info:
        validate(raw)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_defaults_validate():
    from conftest import ROOT

    params = load(ROOT / "params.yaml")
    assert params.distill.objective == "dmd2" and params.data.source == "digits"


def test_malformed_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  lr: [0.1\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML at line \d+"):
        load(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load(tmp_path / "nope.yaml")


def test_stage_prints_one_line_and_writes_nothing(tmp_path):
    params = tiny_params()
    params["distill"]["lr"] = -1
    write_params(tmp_path, params)
    proc = run_stage("prepare", tmp_path, "--out", "prepare", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "[prepare] error: params.yaml: distill.lr must be > 0, got -1"
    assert not (tmp_path / "prepare").exists()


def test_missing_data_source(tmp_path):
    write_params(tmp_path, tiny_params(**{"data.source": str(tmp_path / "nowhere")}))
    proc = run_stage("prepare", tmp_path, "--out", "prepare", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("is neither 'digits' nor an existing path")
    assert not (tmp_path / "prepare").exists()


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    write_params(tmp_path, tiny_params(**{"data.source": str(tmp_path / "flat")}))
    proc = run_stage("prepare", tmp_path, "--out", "prepare", check=False)
    assert proc.returncode == 1 and "one sub-folder per class" in proc.stderr


def test_missing_upstream_output(tmp_path):
    write_params(tmp_path, tiny_params())
    proc = run_stage("teacher", tmp_path, "--prepare", "prepare", "--out", "teacher", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "[teacher] error: prepare/info.json: file not found"


def test_divergence_stops_with_step_and_leaves_nothing(tmp_path):
    """A training stage whose loss blows up stops with the step number; no partial output remains."""
    write_params(tmp_path, tiny_params())
    run_stage("prepare", tmp_path, "--out", "prepare")
    write_params(tmp_path, tiny_params(**{"teacher.p_mean": 100.0}))  # sigma = e^100 overflows float32
    proc = run_stage("teacher", tmp_path, "--prepare", "prepare", "--out", "teacher", check=False)
    assert proc.returncode == 1
    assert "[teacher] error: teacher loss is" in proc.stderr and "at step" in proc.stderr
    assert not (tmp_path / "teacher").exists()
    assert not list(tmp_path.glob(".teacher*"))
