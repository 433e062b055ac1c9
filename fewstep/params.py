"""params.yaml schema: one pydantic model per stage section, validated at every stage start.

A user mistake becomes one line naming the dotted key and what was expected, e.g.
``distill.lr must be > 0, got -1``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """A params.yaml problem, already phrased as one line for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "1200" is not a number, "yes" not a bool


PositiveInt = Field(gt=0)

#: A pair written as a YAML list (strict mode takes only tuples); its items stay strict numbers.
Pair = Annotated[tuple[float, float], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]


class DataParams(Section):
    source: str = "digits"  # "digits", an image folder (one sub-folder per class), or a save_to_disk dataset
    resolution: int = Field(8, ge=4, le=512)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    image_column: str = "image"
    label_column: str = "label"


class FeaturizerParams(Section):
    steps: int = Field(600, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    features: int = Field(128, gt=0)


class EDMParams(Section):
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    rho: float = Field(7.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {self.sigma_min} >= {self.sigma_max}")
        return self


class TeacherParams(Section):
    steps: int = Field(1200, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.1, ge=0, lt=1)
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    channels: list[int] | None = None  # None: chosen from the resolution
    layers_per_block: int = Field(1, gt=0)
    checkpoint_every: int = Field(200, ge=0)  # training steps between resumable checkpoints; 0 = none
    edm: EDMParams = EDMParams()

    @field_validator("channels")
    @classmethod
    def _channels(cls, v):
        if v is not None and (not v or any(c <= 0 or c % 8 for c in v)):
            raise ValueError(f"must be a non-empty list of positive multiples of 8, got {v}")
        return v


class TrajectoriesParams(Section):
    """The teacher's ODE solves (stages/trajectories.py), every family."""

    num_samples: int = Field(2000, gt=0)     # teacher samples of the train split (conditions in turn)
    sampling_steps: int = Field(18, gt=0)  # Heun steps; NFE = 2 * steps - 1 (twice that under CFG)
    guidance: float = Field(1.0, ge=0)     # CFG scale of the teacher (1: no guidance)
    batch_size: int = Field(500, gt=0)
    shard_size: int = Field(1000, gt=0)
    keep_states: bool = True               # also store every ODE state (steps + 1 per sample: consistency)


class GanParams(Section):
    generator_weight: float = Field(3e-3, ge=0)
    critic_weight: float = Field(1e-2, ge=0)


class OptimParams(Section):
    lr: float = Field(2e-4, gt=0)
    betas: Pair = (0.0, 0.99)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    warmup_steps: int = Field(0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"must be two numbers in [0, 1), got {list(v)}")
        return v


# --- one params subsection per objective (fewstep/objectives/<name>.py) ---------------------------------


class DMD2Params(Section):
    ttur: int = Field(3, gt=0)  # fake-score updates per generator update
    gan: GanParams = GanParams()


class DMDParams(Section):
    regression_weight: float = Field(0.25, ge=0)  # DMD1's lambda_reg on the teacher's ODE pairs


class SiDParams(Section):
    alpha: float = Field(1.2, ge=0)  # SiD's alpha; 1.2 is the paper's choice
    ttur: int = Field(1, gt=0)


class ConsistencyParams(Section):
    huber_c: float | None = Field(None, gt=0)  # pseudo-Huber c; null = 0.00054 * sqrt(dimension) (iCT)


class TrainLoopParams(OptimParams):
    """Knobs of the one trainer, shared by every objective."""
    steps: int = Field(400, gt=0)
    batch_size: int = Field(64, gt=0)
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer update (effective batch = batch_size * grad_accum)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    ema_warmup: bool = True  # diffusers' warm-up, decay min(ema_decay, (1+n)/(10+n)) at update n; false: ema_decay throughout
    checkpoint_every: int = Field(50, ge=0)  # training steps between resumable checkpoints; 0 = none
    log_every: int = Field(10, gt=0)


class CriticParams(TrainLoopParams):
    steps: int = Field(100, gt=0)
    gan: GanParams = GanParams()


class ObjectiveParams(TrainLoopParams):
    """What every family's distillation section states the same way: the objective and its subsections,
    backward simulation, CFG on the real score and the DM noise range (each family gives t_min / t_max its
    own units and defaults)."""
    objective: Literal["dmd2", "dmd", "sid", "consistency"] = "dmd2"
    backward_simulation: bool = True  # multi-step: the student's input at step k comes from its own steps < k
    simulate_with: Literal["student", "ema"] = "student"  # weights that run those earlier steps
    real_guidance: float = Field(1.0, ge=0)  # CFG on the real (teacher) score; 1 = none
    t_min: float = Field(0.02, ge=0)
    t_max: float = Field(0.98, gt=0)
    dmd2: DMD2Params = DMD2Params()
    dmd: DMDParams = DMDParams()
    sid: SiDParams = SiDParams()
    consistency: ConsistencyParams = ConsistencyParams()

    @model_validator(mode="after")
    def _t_range(self):
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min must be < t_max, got {self.t_min} >= {self.t_max}")
        return self


class DistillParams(ObjectiveParams):
    student_steps: int = 1
    student_sigmas: list[float] | None = None  # conditioning noise levels; null = spread over the Karras grid
    per_step_critic: bool = False  # multi-step: the fake score / GAN head condition on the step that made a sample
    steps_per_batch: Literal["one", "all"] = "one"  # multi-step: one random step per batch (DMD2) | all, split evenly
    init_student: str | None = None  # a saved fewstep student to start from (e.g. a 1-step one); null = the teacher
    t_min: float = Field(0.02, ge=0, lt=1)  # DM timestep range as fractions of the Karras grid
    t_max: float = Field(0.98, gt=0, le=1)
    eval_every: int = Field(0, ge=0)  # quality curve: score the EMA student every N steps; 0 = off
    eval_samples: int = Field(500, gt=1)  # images per curve point (KID-T vs the teacher, FID vs held-out)

    @field_validator("student_steps")
    @classmethod
    def _steps(cls, v):
        if v not in (1, 2, 4):
            raise ValueError(f"must be 1, 2 or 4, got {v}")
        return v

    @field_validator("student_sigmas")
    @classmethod
    def _sigmas(cls, v):
        if v is not None and (not v or any(s <= 0 for s in v) or any(a <= b for a, b in zip(v, v[1:]))):
            raise ValueError(f"must be a non-empty, strictly decreasing list of positive noise levels, got {v}")
        return v

    @model_validator(mode="after")
    def _sigma_count(self):
        if self.student_sigmas is not None and len(self.student_sigmas) != self.student_steps:
            raise ValueError(f"student_sigmas must have student_steps ({self.student_steps}) entries, "
                             f"got {len(self.student_sigmas)}")
        return self


class FinetuneParams(DistillParams):
    steps: int = Field(100, gt=0)
    lr: float = Field(5e-5, gt=0)

    @field_validator("init_student")
    @classmethod
    def _continues(cls, v):
        if v is not None:
            raise ValueError("must be null: finetune continues the distilled student")
        return v


class EvaluateParams(Section):
    seeds: int = Field(3, gt=0)  # sampling seeds; FID and friends are averaged over them
    batch_size: int = Field(250, gt=0)  # also the batch at which latency is timed
    knn_k: int = Field(3, gt=0)
    grid_size: int = Field(10, gt=0)
    floor_splits: int = Field(20, gt=0)  # random halvings of the held-out images that the floor averages


class RunParams(Section):
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: int = Field(0, ge=0)  # 0: torch's default
    launcher: str = "python"  # how training stages start; data parallel: "torchrun --standalone --nproc_per_node=8"


class Params(Section):
    seed: int = Field(0, ge=0)
    run: RunParams = RunParams()
    data: DataParams = DataParams()
    featurizer: FeaturizerParams = FeaturizerParams()
    teacher: TeacherParams = TeacherParams()
    trajectories: TrajectoriesParams = TrajectoriesParams()
    critic: CriticParams = CriticParams()
    distill: DistillParams = DistillParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_PHRASES = {
    "greater_than": lambda c: f"must be > {_num(c['gt'])}",
    "greater_than_equal": lambda c: f"must be >= {_num(c['ge'])}",
    "less_than": lambda c: f"must be < {_num(c['lt'])}",
    "less_than_equal": lambda c: f"must be <= {_num(c['le'])}",
    "int_parsing": lambda c: "must be an integer",
    "int_from_float": lambda c: "must be an integer",
    "int_type": lambda c: "must be an integer",
    "float_parsing": lambda c: "must be a number",
    "float_type": lambda c: "must be a number",
    "bool_parsing": lambda c: "must be true or false",
    "bool_type": lambda c: "must be true or false",
    "string_type": lambda c: "must be a string",
    "list_type": lambda c: "must be a list",
    "tuple_type": lambda c: "must be a list",
    "literal_error": lambda c: f"must be one of {c['expected']}",
    "model_type": lambda c: "must be a mapping of keys",
    "model_attributes_type": lambda c: "must be a mapping of keys",
}


#: Keys another family's schema has: say where they apply rather than "not a known key".
ELSEWHERE = {
    "run.parallel": "does not apply to this pipeline: FSDP sharding is for the SD pipelines' UNets "
                    "(pipelines/*/params.yaml); here every process trains whole copies",
    "run.shard_teacher": "does not apply to this pipeline: it is an option of FSDP sharding in the SD pipelines",
}


def _one_line(err: dict[str, Any], section: tuple = ()) -> str:
    loc = [str(p) for p in (*section, *err["loc"]) if not isinstance(p, int)]
    key = ".".join(loc) or "params"
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        return f"{key} {ELSEWHERE[key]}" if key in ELSEWHERE else f"{key} is not a known key"
    if kind == "missing":
        return f"{key} is required"
    if kind == "value_error":
        # our own validators phrase their message; pydantic prefixes "Value error, "
        msg = err["msg"].removeprefix("Value error, ")
        return f"{key} {msg}"
    phrase = _PHRASES.get(kind, lambda c: err["msg"].lower())(ctx)
    quoted = kind in ("int_type", "float_type") and isinstance(err["input"], str)
    return f"{key} {phrase}, got {err['input']!r}" + (" (a quoted string: write the number without quotes)" if quoted else "")


def _known_keys_hint(model: type[BaseModel], loc: tuple) -> str:
    """The valid keys of the section where an unknown key was found."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    return f" (valid keys: {', '.join(model.model_fields)})"


#: What makes the student itself: finetune continues distill's student, so these may only repeat distill's values.
STUDENT_KEYS = ("objective", "student_steps", "student_sigmas", "student_timesteps", "lora")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def inherit_distill(raw: dict) -> dict:
    """The finetune section states only what differs from distill: it is distill's section deep-merged with
    its own keys (init_student aside: finetune starts from the distilled student), so `-S distill.x=...`
    reaches both stages. A student key restated with another value is a mistake, said in one line."""
    distill, finetune = raw.get("distill") or {}, raw.get("finetune") or {}
    if not isinstance(distill, dict) or not isinstance(finetune, dict):
        return raw  # validation names the section that is not a mapping
    for key in STUDENT_KEYS:
        if key in finetune and key in distill and finetune[key] != distill[key]:
            raise ParamsError(f"finetune.{key} is {finetune[key]!r} but distill.{key} is {distill[key]!r}: finetune "
                              f"continues distill's student and inherits its {key}; set distill.{key} only")
    return {**raw, "finetune": _deep_merge({k: v for k, v in distill.items() if k != "init_student"}, finetune)}


def validate(raw: Any, schema: type[BaseModel] = Params) -> BaseModel:
    """Validate a params mapping against `schema` (the default pipeline's `Params`, or another
    pipeline's, e.g. fewstep.sd.params.SDParams)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of stage sections, got {type(raw).__name__}")
    if {"distill", "finetune"} <= set(schema.model_fields):
        raw = inherit_distill(raw)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        line = _one_line(err)
        if err["type"] == "extra_forbidden" and not line.endswith(tuple(ELSEWHERE.values())):
            line += _known_keys_hint(schema, err["loc"])
        more = len(exc.errors()) - 1
        raise ParamsError(line + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")) from None


def parse_yaml(text: str) -> Any:
    """YAML 1.2, as DVC reads params (so `1e-4` is a number and `yes` a string, as `dvc exp run -S` means
    them); PyYAML's YAML 1.1 would read `1e-4` as a string and `no` as false."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def load(path: str | Path = "params.yaml", schema: type[BaseModel] = Params) -> BaseModel:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    from ruamel.yaml import YAMLError

    try:
        raw = parse_yaml(path.read_text())
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    try:
        return validate(raw, schema)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
