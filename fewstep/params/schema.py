"""The whole params file: every section under one model, read in its family's terms (finetune inheriting
distill; a text-to-image family's GPU-sized defaults beneath what params.yaml states)."""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from fewstep.params.markers import TEXT_TO_IMAGE, ParamsError, Section, only
from fewstep.params.messages import misplaced_key
from fewstep.params.sections import (BenchmarkParams, CriticParams, DataParams, DistillParams, EncodeParams,
                                     EvaluateParams, FeaturizerParams, FinetuneParams, JudgeParams, PromptsParams,
                                     RunParams, TeacherParams, TrainedTeacherParams, TrajectoriesParams, teacher_kind)


_T2I_LOOP = {"batch_size": 4, "lr": 5e-7, "betas": [0.9, 0.999], "ema_decay": 0.0, "checkpoint_every": 100}
_T2I_DISTILL = {**_T2I_LOOP, "steps": 200, "real_guidance": 8.0,
                "dmd2": {"ttur": 5, "gan": {"generator_weight": 5e-3, "critic_weight": 1e-2}}}
TEXT_TO_IMAGE_DEFAULTS = {
    "trajectories": {"num_samples": 64, "sampling_steps": 25, "guidance": 8.0, "batch_size": 8, "shard_size": 256,
                     "keep_states": False},  # latents' ODE states are large: kept for the consistency objective only
    "critic": {**_T2I_LOOP, "steps": 50, "gan": {"generator_weight": 5e-3, "critic_weight": 1e-2}},
    "distill": _T2I_DISTILL,
    "finetune": {**_T2I_DISTILL, "steps": 50, "lr": 2e-7},
    "evaluate": {"seeds": 1, "batch_size": 8, "grid_size": 4},  # a seed beyond the first re-solves the teacher
}


def _family_of(raw: dict) -> str:
    teacher = raw.get("teacher")
    if isinstance(teacher, dict) and teacher_kind(teacher) == "pretrained":
        family = teacher.get("family", "sdxl")
        return family if family in TEXT_TO_IMAGE else "sdxl"  # an unknown family: the teacher section says so
    return "edm"


class Params(Section):
    seed: int = Field(0, ge=0)
    run: RunParams = RunParams()
    data: DataParams = DataParams()  # real data: the edm teacher's, or a text-to-image mini teacher's
    featurizer: FeaturizerParams = FeaturizerParams()  # the evaluation classifier trained on it
    teacher: TeacherParams = TrainedTeacherParams()
    prompts: PromptsParams = only(TEXT_TO_IMAGE)  # required there (checked below); None in the edm family
    encode: EncodeParams = only(TEXT_TO_IMAGE, EncodeParams())
    trajectories: TrajectoriesParams = TrajectoriesParams()
    critic: CriticParams = CriticParams()
    distill: DistillParams = DistillParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    benchmark: BenchmarkParams = only(TEXT_TO_IMAGE, BenchmarkParams())
    judge: JudgeParams = only(TEXT_TO_IMAGE, JudgeParams())  # the *-digits pipelines' plain-diffusers judgement

    @property
    def family(self) -> str:
        return self.teacher.family

    @model_validator(mode="before")
    @classmethod
    def _as_the_family_reads_it(cls, raw: Any) -> Any:
        """What params.yaml states, checked against its family, with finetune inheriting distill and, for a
        text-to-image family, its defaults beneath."""
        if not isinstance(raw, dict):
            return raw
        family = _family_of(raw)
        misplaced = misplaced_key(raw, cls, family)
        if misplaced:
            raise ParamsError(misplaced)
        raw = inherit_distill(raw)
        if family in TEXT_TO_IMAGE:
            raw = {**raw, **{section: _deep_merge(defaults, raw[section]) if isinstance(raw.get(section), dict)
                             else raw.get(section, defaults) for section, defaults in TEXT_TO_IMAGE_DEFAULTS.items()}}
        return raw

    @model_validator(mode="after")
    def _family_terms(self):
        """Keys whose values are read in the family's terms."""
        if self.family in TEXT_TO_IMAGE and self.prompts is None:
            raise ParamsError("prompts is required for a text-to-image teacher (prompts.source: the prompts to distill on)")
        ranges = {"critic.gan.t_min": self.critic.gan.t_min, "critic.gan.t_max": self.critic.gan.t_max}
        for name in ("distill", "finetune"):
            section = getattr(self, name)
            ranges |= {f"{name}.t_min": section.t_min, f"{name}.t_max": section.t_max,
                       f"{name}.dmd2.gan.t_min": section.dmd2.gan.t_min, f"{name}.dmd2.gan.t_max": section.dmd2.gan.t_max}
            if section.t_range_end is not None:
                ranges |= {f"{name}.t_range_end[0]": section.t_range_end[0],
                           f"{name}.t_range_end[1]": section.t_range_end[1]}
                if not 0 <= section.t_range_end[0] < section.t_range_end[1]:
                    raise ParamsError(f"{name}.t_range_end must be [t_min, t_max] with 0 <= t_min < t_max, "
                                      f"got {list(section.t_range_end)}")
        for key, value in ranges.items():
            if value is None:
                continue
            if value > 1:
                hint = ("; a DDPM timestep T is position 1 - T/1000, so DMD2's 20..980 is 0.02..0.98"
                        if self.family in TEXT_TO_IMAGE else "")
                raise ParamsError(f"{key} must be in [0, 1], a position on the teacher's noise schedule "
                                  f"(0 = the noisiest level, 1 = the cleanest), got {value:g}{hint}")
        for name in ("distill", "finetune"):
            section = getattr(self, name)
            if self.family in TEXT_TO_IMAGE and section.student_timesteps is None:
                k = section.student_steps
                section.student_timesteps = [999 - j * 1000 // k for j in range(k)]
        return self


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
