"""The pieces every params section is built from: the strict section base, the families a key belongs to, and
the error every params problem is raised as (one line, naming the dotted key)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class ParamsError(ValueError):
    """A params.yaml problem, already phrased as one line for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "1200" is not a number, "yes" not a bool


EDM = ("edm",)
TEXT_TO_IMAGE = ("sdxl", "sd15", "sd3")
Family = Literal["edm", "sdxl", "sd15", "sd3"]
FAMILY_NAMES = {EDM: "the edm family (a teacher trained from data)",
                TEXT_TO_IMAGE: "the text-to-image families (sdxl, sd15, sd3)"}


def only(families: tuple[str, ...], default: Any = None, **constraints) -> Any:
    """A key that the `families` have and the others do not: setting it elsewhere is one error line."""
    return Field(default, json_schema_extra={"families": list(families)}, **constraints)


def ordered(low: str, high: str):
    """A section check that key `low` < key `high`."""
    def check(self):
        if getattr(self, low) >= getattr(self, high):
            raise ValueError(f"{low} must be < {high}, got {getattr(self, low)} >= {getattr(self, high)}")
        return self
    return model_validator(mode="after")(check)


#: A pair written as a YAML list (strict mode takes only tuples); its items stay strict numbers.
Pair = Annotated[tuple[float, float], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]
