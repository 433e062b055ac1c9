"""params.yaml schema, one for every model family: one pydantic model per stage section, validated at every
stage start.

`teacher.family` names the family: `edm` (the default: a teacher trained from data, digits or an image folder)
or a text-to-image one (`sdxl`, `sd15`, `sd3`: a pretrained teacher at `teacher.path`). Every section means the
same in every family; a key that only one kind of family has says so in its field (`only(...)`), and setting it
in another family's params stops with one line saying where it applies. Text-to-image pipelines start from
their own defaults (`TEXT_TO_IMAGE_DEFAULTS`, GPU-sized values) under what params.yaml states. `finetune`
inherits `distill` and states only what differs.

A user mistake becomes one line naming the dotted key and what was expected, e.g.
``distill.lr must be > 0, got -1``.
"""
from fewstep.params.loading import load, parse_yaml, validate
from fewstep.params.markers import EDM, FAMILY_NAMES, TEXT_TO_IMAGE, ParamsError
from fewstep.params.probe import ReadRecorder
from fewstep.params.schema import Params
from fewstep.params.sections import DistillParams, EDMParams, TrainLoopParams

__all__ = ["EDM", "FAMILY_NAMES", "TEXT_TO_IMAGE", "DistillParams", "EDMParams", "Params", "ParamsError",
           "ReadRecorder", "TrainLoopParams", "load", "parse_yaml", "validate"]
