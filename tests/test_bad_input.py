"""Bad params and inputs: each fails with one clear line naming the key or file, leaves nothing
half-written behind, and never unpickles anything.

The table (BAD_INPUTS) runs the real stage scripts and the `fewstep` CLI on copies of one tiny
upstream pipeline built once per module. Every case checks: exit status, stderr is exactly one line
starting with the expected message, the working directory is byte-for-byte unchanged (so a stage's
output is absent or untouched and no temporary sibling is left), and no pickle was opened or
unpickled (an audit hook in every subprocess records pickle.find_class and opens of .bin/.pt/... files).
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, STAGE_ARGS, run, run_stage, tiny_params, write_image_folder, write_params
from fewstep.pipeline.hashing import file_digest
from fewstep.io import ArtifactError, load_trajectories
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
    ({"critic": {"gan": {"features": "mid"}}}, "critic.gan.features must be one of 'bottleneck' or 'decoder', got 'mid'"),
    ({"teacher": {"edm": {"sigma_min": 100}}}, "teacher.edm sigma_min must be < sigma_max, got 100.0 >= 80.0"),
    ({"teacher": {"channels": [32, 60]}}, "teacher.channels must be a non-empty list of positive multiples of 8"),
    ({"teacher": {"ema_decay": 1.0}}, "teacher.ema_decay must be < 1, got 1.0"),
    ({"data": {"resolution": 2}}, "data.resolution must be >= 4, got 2"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction must be < 1, got 1.5"),
    ({"seed": -3}, "seed must be >= 0, got -3"),
    ({"run": {"device": "tpu"}}, "run.device must be one of 'cpu', 'cuda' or 'auto', got 'tpu'"),
    ({"trajectories": {"num_samples": None}}, "trajectories.num_samples must be an integer, got None"),
    ({"evaluate": "fast"}, "evaluate must be a mapping of keys, got 'fast'"),
    ({"distil": {"lr": 1}}, "distil is not a known key (did you mean distill? valid keys: seed, run, data,"),
    ({"finetune": {"init_student": "distill/student"}},
     "finetune.init_student must be null: finetune continues the distilled student"),
    ({"distill": {"student_steps": 1}, "finetune": {"student_steps": 4}},
     "finetune.student_steps is 4 but distill.student_steps is 1: finetune continues distill's student and inherits "
     "its student_steps; set distill.student_steps only"),
    ({"finetune": {"lr": -1}}, "finetune.lr must be > 0, got -1"),
    ({"run": {"parallel": "fsdp"}}, "run.parallel applies to the text-to-image families (sdxl, sd15, sd3) only; "
                                    "this pipeline's teacher.family is edm"),
    ({"distill": {"lora": {"rank": 4}}}, "distill.lora applies to the text-to-image families (sdxl, sd15, sd3) only"),
    ({"distill": {"t_max": 980}}, "distill.t_max must be in [0, 1], a position on the teacher's noise schedule "
                                  "(0 = the noisiest level, 1 = the cleanest), got 980"),
    ({"teacher": {"path": "t"}, "prompts": {"source": "p"}, "distill": {"per_step_critic": True}},
     "distill.per_step_critic applies to the edm family (a teacher trained from data) only; this pipeline's "
     "teacher.family is sdxl"),
    ({"teacher": {"path": "t"}, "prompts": {"source": "p"}, "distill": {"t_max": 980}},
     "distill.t_max must be in [0, 1], a position on the teacher's noise schedule (0 = the noisiest level, 1 = the "
     "cleanest), got 980; a DDPM timestep T is position 1 - T/1000, so DMD2's 20..980 is 0.02..0.98"),
    ({"teacher": {"path": "t", "family": "sd4"}}, "teacher.family must be one of 'edm', 'sdxl', 'sd15' or 'sd3', got 'sd4'"),
    ({"teacher": {"path": "t"}}, "prompts is required for a text-to-image teacher"),
]


@pytest.mark.parametrize("raw,message", CASES, ids=[m.split(" ")[0] for _, m in CASES])
def test_bad_params_one_line(raw, message):
    with pytest.raises(ParamsError) as info:
        validate(raw)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def _family_keys(model, prefix=""):
    """(dotted key, families) of every key the schema marks as some families' only."""
    from fewstep.params.messages import model_in

    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("families"):
            yield prefix + name, tuple(extra["families"])
        inner = model_in(info.annotation)
        if inner is not None:
            yield from _family_keys(inner, f"{prefix}{name}.")


def test_a_key_of_another_family_stops_with_one_line_saying_where_it_applies():
    """One schema for every family: each key only some families have is refused in the others, by name."""
    from fewstep.params import EDM, Params

    keys = dict(_family_keys(Params))
    # data and featurizer are every family's: the edm teacher's data, or a text-to-image mini teacher's (*-digits)
    assert not {"data", "featurizer"} & set(keys)
    assert {"prompts", "run.parallel", "distill.lora", "distill.per_step_critic", "finetune.student_sigmas",
            "evaluate.floor_splits", "evaluate.fid", "trajectories.eval_per_prompt"} <= set(keys)
    for key, families in keys.items():
        family = "sd3" if families == EDM else "edm"
        raw = {"teacher": {"path": "t", "family": family}, "prompts": {"source": "p"}} if family != "edm" else {}
        *sections, last = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = None
        with pytest.raises(ParamsError) as info:
            validate(raw)
        where = "the edm family (a teacher trained from data)" if families == EDM else \
            "the text-to-image families (sdxl, sd15, sd3)"
        assert str(info.value) == f"{key} applies to {where} only; this pipeline's teacher.family is {family}"


def test_finetune_inherits_distill_and_states_only_what_differs():
    params = load(ROOT / "params.yaml")
    assert (params.finetune.steps, params.finetune.lr, params.finetune.eval_every) == (60, 5e-5, 20)
    assert params.finetune.model_dump(exclude={"steps", "lr", "eval_every", "init_student"}) == \
        params.distill.model_dump(exclude={"steps", "lr", "eval_every", "init_student"})
    raw = {"distill": {"student_steps": 4, "t_max": 0.9, "dmd2": {"gan": {"critic_weight": 0.05}}, "init_student": "x"},
           "finetune": {"lr": 1e-5, "dmd2": {"ttur": 1}}}
    tuned = validate(raw)
    assert tuned.finetune.student_steps == 4 and tuned.finetune.t_max == 0.9 and tuned.finetune.lr == 1e-5
    assert tuned.finetune.dmd2.ttur == 1 and tuned.finetune.dmd2.gan.critic_weight == 0.05  # merged, not replaced
    assert tuned.finetune.init_student is None  # finetune starts from the distilled student
    assert validate({"distill": {"student_steps": 4}, "finetune": {"student_steps": 4}}).finetune.student_steps == 4
    sd = validate({"teacher": {"path": "t"}, "prompts": {"source": "p"}, "distill": {"student_timesteps": [399]}})
    assert sd.finetune.student_timesteps == [399] and sd.finetune.steps == 50  # the finetune default where unstated
    assert sd.finetune.student_steps == 1 and sd.distill.lr == 5e-7  # counted from the timesteps; the family's default
    four = validate({"teacher": {"path": "t", "family": "sd3"}, "prompts": {"source": "p"}, "distill": {"student_steps": 4}})
    assert four.finetune.student_timesteps == [999, 749, 499, 249]  # one -S distill.student_steps=4 for every family


def test_defaults_validate():
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


# --- The bad-input table: real stages and CLI on copies of one tiny upstream ------------------------

UPSTREAM = {stage: STAGE_ARGS[stage] for stage in ("prepare", "teacher", "trajectories", "critic", "distill")}
EVALUATE = [*STAGE_ARGS["evaluate"][:STAGE_ARGS["evaluate"].index("--student")],
            "--student", "distill/student", "--samples", "evaluate/samples", "--metrics", "evaluate/metrics.json"]
FINETUNE = STAGE_ARGS["finetune"]

# Runs inside every subprocess of this module (PYTHONPATH): records anything that opens a pickle-format
# weight file or unpickles a global. torch.load's weights-only unpickler is caught by the open.
PICKLE_GUARD = '''
import os, sys
_LOG = os.environ.get("FEWSTEP_PICKLE_LOG")
_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

def _note(line):
    with open(_LOG, "a") as f:
        f.write(line + "\\n")

def _hook(event, args):
    if event == "pickle.find_class":
        _note(f"unpickled {args[0]}.{args[1]}")
    elif event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        name = os.fsdecode(args[0])
        if name.endswith(_SUFFIXES):
            _note(f"opened {name}")

if _LOG:
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    """The pickle guard and a private datasets cache for every subprocess; yields the guard's log file."""
    folder = tmp_path_factory.mktemp("guard")
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(PICKLE_GUARD)
    log = folder / "pickle.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(folder / "site"), os.environ.get("PYTHONPATH")) if p))
        mp.setenv("FEWSTEP_PICKLE_LOG", str(log))
        mp.setenv("HF_DATASETS_CACHE", str(folder / "hf-datasets"))
        yield log


def pickle_activity(log: Path) -> str:
    return log.read_text() if log.exists() else ""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, guard):
    folder = tmp_path_factory.mktemp("upstream")
    write_params(folder, tiny_params())
    for stage, args in UPSTREAM.items():
        run_stage(stage, folder, *args)
    assert pickle_activity(guard) == "", "a healthy pipeline run touched a pickle"
    return folder


def test_pickle_guard_sees_pickles(guard, tmp_path):
    """The guard itself can fail: torch.load (even weights-only) and pickle.loads are both recorded."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.bin")
    guard.unlink(missing_ok=True)
    code = ("import pickle, collections, torch; torch.load('weights.bin', weights_only=True); "
            "pickle.loads(pickle.dumps(collections.OrderedDict()))")
    run([sys.executable, "-c", code], tmp_path)
    log = pickle_activity(guard)
    guard.unlink()
    assert "opened weights.bin" in log and "unpickled collections.OrderedDict" in log


# Setup helpers: each returns a function that damages a copy of the upstream folder `w`.

def steps(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda w: [fn(w) for fn in fns]


def remove(rel: str):
    return lambda w: shutil.rmtree(w / rel) if (w / rel).is_dir() else (w / rel).unlink()


def halve(rel: str):
    """Cut a file in half, as an interrupted copy or download would."""
    def fn(w):
        data = (w / rel).read_bytes()
        (w / rel).write_bytes(data[: len(data) // 2])
    return fn


def write(rel: str, content: str | bytes):
    def fn(w):
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    return fn


def params(**overrides):
    return lambda w: write_params(w, tiny_params(**overrides))


def unquoted_param(dotted: str, text: str):
    """The tiny params with one value written verbatim (no YAML quoting), as a user would type it."""
    def fn(w):
        marker = "__VALUE__"
        dumped = write_params(w, tiny_params(**{dotted: marker})).read_text()
        (w / "params.yaml").write_text(dumped.replace(marker, text))
    return fn


def edit_json(rel: str, change: Callable[[dict], None]):
    def fn(w):
        obj = json.loads((w / rel).read_text())
        change(obj)
        (w / rel).write_text(json.dumps(obj))
    return fn


def edit_tensors(rel: str, change: Callable[[dict], dict]):
    return lambda w: save_file(change(load_file(w / rel)), w / rel)


def images(classes: int = 3, garbage: str | None = None):
    """A 28px image folder `images/` with `classes` class sub-folders, optionally one garbage 'image'."""
    def fn(w):
        write_image_folder(w / "images", per_class=4, size=28)
        for extra in sorted((w / "images").iterdir())[classes:]:
            shutil.rmtree(extra)
        if garbage:
            (w / "images" / garbage).write_bytes(os.urandom(256))
        write_params(w, tiny_params(**{"data.source": "images"}))
    return fn


def empty_dir(rel: str):
    return lambda w: (shutil.rmtree(w / rel), (w / rel).mkdir())


def pickled_weights(rel: str):
    """Replace a UNet's safetensors weights with the same state dict saved by torch.save (a pickle)."""
    def fn(w):
        file = w / rel / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(file), w / rel / "diffusion_pytorch_model.bin")
        file.unlink()
    return fn


def narrow_gan_head(w):
    """GAN-head weights of width 32 under a gan_head.json that says width 64 (for the default's decoder
    features: 32 input channels)."""
    from fewstep.core.heads import GanHead

    assert json.loads((w / "critic/critic/gan_head.json").read_text()) == {"in_channels": 32, "width": 64}
    save_file(GanHead(32, width=32).state_dict(), w / "critic/critic/gan_head.safetensors")


VAE_CONFIG = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
              "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
              "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
              "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
              "up_block_types": ["UpDecoderBlock2D"] * 4}


@dataclass
class Case:
    id: str
    command: list[str]          # [stage, *args] for a stage script, or ["fewstep", *args] for the CLI
    message: str                # the one stderr line starts with this
    setup: Callable[[Path], None] = field(default=lambda w: None)
    returncode: int = 1


def case(id, command, message, setup=lambda w: None, returncode=1, xfail=None):
    c = Case(id, command, message, setup, returncode)
    return pytest.param(c, id=id, marks=[pytest.mark.xfail(strict=True, reason=xfail)] if xfail else [])


BAD_INPUTS = [
    # -- params files, through a real stage (the validation rules themselves are covered above)
    case("yaml-malformed", ["prepare", "--out", "prepare"],
         "[prepare] error: params.yaml: not valid YAML at line 3: expected ',' or ']', but got '<stream end>'",
         write("params.yaml", "distill:\n  lr: [0.1\n")),
    case("yaml-not-a-mapping", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: params.yaml: params must be a mapping of stage sections, got list",
         write("params.yaml", "- seed\n- run\n")),
    case("params-unknown-key", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: params.yaml: teacher.stepz is not a known key (did you mean steps? valid keys: steps, batch_size, lr,",
         params(**{"teacher.stepz": 3})),
    case("params-wrong-type", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: params.yaml: trajectories.num_samples must be an integer, got 'many'",
         params(**{"trajectories.num_samples": "many"})),
    case("params-impossible-value", ["prepare", "--out", "prepare"],
         "[prepare] error: params.yaml: distill.lr must be > 0, got -1", params(**{"distill.lr": -1})),
    # -- missing data and upstream outputs
    case("data-source-missing", ["prepare", "--out", "prepare"],
         "[prepare] error: data.source: 'nowhere' is neither 'digits' nor an existing path",
         params(**{"data.source": "nowhere"})),
    case("prepare-missing", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: prepare/info.json: file not found", remove("prepare")),
    case("prepare-data-missing", ["critic", *UPSTREAM["critic"]],
         "[critic] error: prepare/data.safetensors: file not found (did the upstream stage run?)",
         remove("prepare/data.safetensors")),
    case("teacher-missing", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model: no such model directory (did the upstream stage run?)",
         remove("teacher")),
    case("init-student-missing", ["distill", *UPSTREAM["distill"]],
         "[distill] error: distill.init_student: nowhere: no such model directory",
         params(**{"distill.init_student": "nowhere"})),
    case("init-student-is-a-critic", ["distill", *UPSTREAM["distill"]],
         "[distill] error: distill.init_student: critic/critic is a critic, expected a student distilled from this "
         "teacher", params(**{"distill.init_student": "critic/critic"})),
    case("distill-missing", ["finetune", *FINETUNE],
         "[finetune] error: distill/student: no such model directory (did the upstream stage run?)",
         remove("distill")),
    case("images-garbage-file", ["prepare", "--out", "prepare"],
         "[prepare] error: images: class_1/broken.png is not a readable image (UnidentifiedImageError)",
         images(garbage="class_1/broken.png")),
    case("images-empty-class-folders", ["prepare", "--out", "prepare"],
         "[prepare] error: images: its 2 class sub-folder(s) hold no images (.png, .jpg, ...)",
         steps(write("images/class_0/notes.txt", "no images here"), write("images/class_1/.keep", ""),
               params(**{"data.source": "images"}))),
    case("images-no-class-folders", ["prepare", "--out", "prepare"],
         "[prepare] error: images: an image folder needs one sub-folder per class, found none",
         steps(write("images/a.png", b""), params(**{"data.source": "images"}))),
    case("images-one-class", ["prepare", "--out", "prepare"],
         "[prepare] error: images: only one class sub-folder holds images (class_0); "
         "a class-conditional model needs at least 2 classes", images(classes=1)),
    # -- truncated safetensors
    case("data-truncated", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: prepare/data.safetensors: not a readable safetensors file "
         "(Error while deserializing header: incomplete metadata, file not fully covered)",
         halve("prepare/data.safetensors")),
    case("teacher-weights-truncated", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model/unet/diffusion_pytorch_model.safetensors: not a readable safetensors "
         "file (Error while deserializing header: incomplete metadata, file not fully covered)",
         halve("teacher/model/unet/diffusion_pytorch_model.safetensors")),
    case("trajectory-shard-truncated", ["evaluate", *EVALUATE],
         "[evaluate] error: trajectories/train-00001.safetensors: not a readable safetensors file "
         "(Error while deserializing header: incomplete metadata, file not fully covered)",
         halve("trajectories/train-00001.safetensors")),
    # -- safetensors with the wrong tensors
    case("data-wrong-keys", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: prepare/data.safetensors: missing tensors ['train_images', 'train_labels'], "
         "found ['images', 'labels']",
         edit_tensors("prepare/data.safetensors", lambda t: {"images": t["train_images"], "labels": t["train_labels"]})),
    case("data-wrong-shape", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: prepare/data.safetensors: train_images is float32 [1438, 1, 4, 4], "
         "expected float [N, 1, 8, 8] as prepare/info.json says",
         edit_tensors("prepare/data.safetensors", lambda t: t | {"train_images": t["train_images"][..., ::2, ::2].contiguous()})),
    case("data-labels-out-of-range", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: prepare/data.safetensors: train_labels range over [20, 29], "
         "expected [0, 9] for the 10 classes in prepare/info.json",
         edit_tensors("prepare/data.safetensors", lambda t: t | {"train_labels": t["train_labels"] + 20})),
    case("featurizer-wrong-keys", ["evaluate", *EVALUATE],
         "[evaluate] error: prepare/featurizer/featurizer.safetensors: weights do not fit the model "
         "(missing 'body.0.bias'; 16 missing, 16 unexpected keys)",
         edit_tensors("prepare/featurizer/featurizer.safetensors", lambda t: {f"model.{k}": v for k, v in t.items()})),
    # -- checkpoints whose shapes do not fit
    case("teacher-config-mismatch", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model/unet: weights do not fit config.json "
         "(conv_in.weight is [32, 1, 3, 3], config.json gives [64, 1, 3, 3])",
         edit_json("teacher/model/unet/config.json", lambda c: c.update(block_out_channels=[64, 64]))),
    case("critic-gan-head-wrong-shape", ["distill", *UPSTREAM["distill"]],
         "[distill] error: critic/critic/gan_head.safetensors: weights do not fit the model "
         "(net.0.weight has shape [32, 32, 4, 4], expected [64, 32, 4, 4])", narrow_gan_head),
    # -- teacher directories that are not fewstep / diffusers models
    case("teacher-empty-dir", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model: not a fewstep model directory (missing fewstep.json)",
         empty_dir("teacher/model")),
    case("teacher-random-files", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model: not a fewstep model directory (missing fewstep.json)",
         steps(empty_dir("teacher/model"), write("teacher/model/weights.dat", os.urandom(512)),
               write("teacher/model/notes.md", "# a model\n"))),
    case("teacher-vae-config", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model/unet/config.json: _class_name is 'AutoencoderKL', expected 'UNet2DModel'",
         write("teacher/model/unet/config.json", json.dumps(VAE_CONFIG))),
    case("fewstep-json-invalid", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model/fewstep.json: not valid JSON (Expecting property name enclosed in double quotes",
         write("teacher/model/fewstep.json", "{role: teacher}")),
    case("fewstep-json-incomplete", ["critic", *UPSTREAM["critic"]],
         "[critic] error: teacher/model/fewstep.json: 'num_classes' must be a positive integer, got None",
         edit_json("teacher/model/fewstep.json", lambda info: info.pop("num_classes"))),
    case("teacher-pickle-weights-only", ["trajectories", *UPSTREAM["trajectories"]],
         "[trajectories] error: teacher/model/unet: only pickled weights (diffusion_pytorch_model.bin); "
         "fewstep loads safetensors only and never unpickles", pickled_weights("teacher/model/unet")),
    case("index-lists-missing-shard", ["evaluate", *EVALUATE],
         "[evaluate] error: trajectories/train-00002.safetensors: file not found (did the upstream stage run?)",
         edit_json("trajectories/index.json", lambda i: (i["train"]["shards"].append({"file": "train-00002.safetensors", "count": 5}),
                                                         i["train"].update(num_samples=i["train"]["num_samples"] + 5)))),
    case("index-omits-a-shard", ["evaluate", *EVALUATE],
         "[evaluate] error: trajectories/index.json: does not list train-00001.safetensors",
         edit_json("trajectories/index.json", lambda i: i["train"]["shards"].pop())),
    # -- `fewstep sample` arguments
    case("cli-no-model", ["fewstep", "sample"],
         "fewstep sample: error: the following arguments are required: --model", returncode=2),
    case("cli-steps-zero", ["fewstep", "sample", "--model", "teacher/model", "--steps", "0"],
         "fewstep sample: error: --steps must be >= 1, got 0", returncode=2),
    case("cli-steps-not-a-number", ["fewstep", "sample", "--model", "teacher/model", "--steps", "two"],
         "fewstep sample: error: argument --steps: invalid int value: 'two'", returncode=2),
    case("cli-model-missing", ["fewstep", "sample", "--model", "nowhere"],
         "fewstep sample: error: nowhere: no such model directory"),
    case("cli-model-is-a-critic", ["fewstep", "sample", "--model", "critic/critic"],
         "fewstep sample: error: --model critic/critic is a critic, not a teacher or student model"),
    case("cli-label-out-of-range", ["fewstep", "sample", "--model", "teacher/model", "--label", "10"],
         "fewstep sample: error: --label must be in [0, 9] for teacher/model, got 10"),
    case("cli-out-not-an-image", ["fewstep", "sample", "--model", "distill/student", "--out", "grid.txt"],
         "fewstep sample: error: --out must name an image file (e.g. grid.png), got 'grid.txt'"),
    case("cli-out-folder-missing", ["fewstep", "sample", "--model", "distill/student", "--out", "grids/a.png"],
         "fewstep sample: error: --out grids/a.png: folder grids does not exist (create it, or write elsewhere)"),
    case("cli-model-is-the-stage-folder", ["fewstep", "sample", "--model", "teacher"],
         "fewstep sample: error: --model teacher is a stage output folder; the model in it is teacher/model"),
    case("cli-student-steps-not-a-divisor", ["fewstep", "sample", "--model", "distill/student", "--steps", "4"],
         "fewstep sample: error: --steps must divide the 1-step student's steps (1) for distill/student, got 4"),
    # params a user would expect to be refused rather than silently coerced
    case("params-number-as-string", ["teacher", *UPSTREAM["teacher"]],
         "[teacher] error: params.yaml: teacher.steps must be an integer, got '1200' "
         "(a quoted string: write the number without quotes)", params(**{"teacher.steps": "1200"})),
    case("params-bool-as-word", ["teacher", *UPSTREAM["teacher"]],  # YAML 1.2, as DVC reads it: `yes` is a word
         "[teacher] error: params.yaml: distill.backward_simulation must be true or false, got 'yes'",
         unquoted_param("distill.backward_simulation", "yes")),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (xxh3) and directory under `folder`."""
    return {p.relative_to(folder).as_posix(): file_digest(p) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input(bad: Case, upstream, guard, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(upstream, work)
    bad.setup(work)
    before = snapshot(work)
    guard.unlink(missing_ok=True)
    if bad.command[0] == "fewstep":
        proc = run([str(Path(sys.executable).parent / "fewstep"), *bad.command[1:]], work, check=False)
    else:
        proc = run_stage(bad.command[0], work, *bad.command[1:], check=False)

    assert proc.returncode == bad.returncode, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(bad.message), proc.stderr[-3000:]
    after = snapshot(work)
    leftovers = sorted(set(after) - set(before))
    assert not leftovers, f"left behind: {leftovers}"
    assert after == before, f"changed: {sorted(k for k in before if after.get(k) != before[k])}"
    assert pickle_activity(guard) == ""


def test_every_stage_of_the_default_meets_bad_input():
    """Each stage dvc.yaml declares has at least one bad-input case above (a stage added without one fails)."""
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    covered = {case.values[0].command[0] for case in BAD_INPUTS}
    assert stages - covered == set()


# --- In-process checks of the library readers -------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (lambda i: i["train"]["shards"].pop(), "does not list train-00001.safetensors"),
    (lambda i: i["train"].update(num_samples=50), "train shards hold 40 samples, num_samples says 50"),
    (lambda i: i["train"]["shards"][1].update(count=20), "train shards hold 45 samples, num_samples says 40"),
    (lambda i: i["train"]["shards"][0].update(file="../prepare/data.safetensors"),
     "shard '../prepare/data.safetensors' must be"),
    (lambda i: i.pop("train"), "no 'train' split (found [])"),
], ids=["unlisted-shard", "num-samples", "count-sum", "outside-folder", "no-split"])
def test_trajectories_index_disagrees(upstream, tmp_path, change, message):
    folder = tmp_path / "trajectories"
    shutil.copytree(upstream / "trajectories", folder)
    edit_json("index.json", change)(folder)
    with pytest.raises(ArtifactError) as info:
        load_trajectories(folder)
    assert str(info.value).startswith(f"{folder / 'index.json'}: {message}"), str(info.value)


def test_trajectories_shard_count_disagrees(upstream, tmp_path):
    folder = tmp_path / "trajectories"
    shutil.copytree(upstream / "trajectories", folder)
    edit_json("index.json", lambda i: (i["train"]["shards"][0].update(count=20),
                                       i["train"]["shards"][1].update(count=20)))(folder)
    with pytest.raises(ArtifactError, match=r"train-00000.safetensors: noise holds 25 samples, .*index.json says 20"):
        load_trajectories(folder)
    assert len(load_trajectories(upstream / "trajectories")["cond_index"]) == 40
    edit_json("index.json", lambda i: i.update(keep_states=False))(folder)
    with pytest.raises(ArtifactError, match=r"index.json: holds no ODE states \(set trajectories.keep_states: true"):
        load_trajectories(folder, states=True)


def test_divergence_stops_with_step_and_leaves_nothing(upstream, tmp_path):
    """A training stage whose loss blows up stops with the step number; its previous output stays as it was."""
    work = tmp_path / "work"
    shutil.copytree(upstream, work)
    write_params(work, tiny_params(**{"teacher.p_mean": 100.0}))  # sigma = e^100 overflows float32
    before = snapshot(work)
    proc = run_stage("teacher", work, *UPSTREAM["teacher"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("[teacher] error: teacher loss is nan at step 0")
    assert snapshot(work) == before


def test_sample_help_shows_the_defaults():
    proc = subprocess.run([str(Path(sys.executable).parent / "fewstep"), "sample", "--help"], capture_output=True,
                          text=True, check=True)
    text = " ".join(proc.stdout.split())
    for default in ("(default: grid.png)", "(default: 10)", "(default: 0)", "(default: cpu)",
                    "(default: one class per column)"):
        assert default in text, text
