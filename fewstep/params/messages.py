"""Params problems as one line each: pydantic's errors in the user's dotted keys, a key set in a family that
does not have it, the valid keys near an unknown one."""
from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel

from fewstep.params.markers import FAMILY_NAMES
from fewstep.params.sections import TEACHER_SHAPES


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds (directly or as `X | None`), if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def misplaced_key(raw: dict, model: type[BaseModel], family: str, prefix: str = "") -> str | None:
    """The first key `raw` states that `family` does not have, phrased as the error line."""
    for key, value in raw.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue  # an unknown key: validation names it
        families = (field.json_schema_extra or {}).get("families") if isinstance(field.json_schema_extra, dict) else None
        if families and family not in families:
            return (f"{prefix}{key} applies to {FAMILY_NAMES[tuple(families)]} only; "
                    f"this pipeline's teacher.family is {family}")
        inner = model_in(field.annotation)
        if inner is not None and isinstance(value, dict):
            found = misplaced_key(value, inner, family, f"{prefix}{key}.")
            if found:
                return found
    return None


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


def _dotted(loc: tuple) -> list[str]:
    """A pydantic error location as the user's keys (list indices and the teacher section's shape tags dropped)."""
    return [str(p) for p in loc if not isinstance(p, int) and p not in TEACHER_SHAPES]


def one_line(err: dict[str, Any]) -> str:
    key = ".".join(_dotted(err["loc"])) or "params"
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        return f"{key} is not a known key"
    if kind == "missing":
        return f"{key} is required"
    if kind == "value_error":
        # our own validators phrase their message; pydantic prefixes "Value error, "
        msg = err["msg"].removeprefix("Value error, ")
        return f"{key} {msg}" if err["loc"] else msg
    phrase = _PHRASES.get(kind, lambda c: err["msg"].lower())(ctx)
    quoted = kind in ("int_type", "float_type") and _is_number(err["input"])
    return f"{key} {phrase}, got {err['input']!r}" + (" (a quoted string: write the number without quotes)" if quoted else "")


def _is_number(value: Any) -> bool:
    """A string that holds a number (`"1200"`): the user quoted a number, as opposed to writing a word."""
    try:
        return isinstance(value, str) and float(value) == float(value)
    except ValueError:
        return False


def known_keys_hint(loc: tuple, model: type[BaseModel] | None) -> str:
    """The valid keys of the section of `model` (the whole params model) where an unknown key was found."""
    for part in loc[:-1]:
        if isinstance(part, str) and part in TEACHER_SHAPES:
            model = TEACHER_SHAPES[part]
        else:
            field = model.model_fields.get(str(part)) if model is not None else None
            model = model_in(field.annotation) if field is not None else None
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" ({f'did you mean {close[0]}? ' if close else ''}valid keys: {', '.join(model.model_fields)})"


def own_errors(errors: list[dict], raw: dict) -> list[dict]:
    """Pydantic's errors less the echoes of inheritance: a bad distill key finetune does not state is reported
    under finetune too (finetune inherits it); the user wrote it once, under distill."""
    finetune = raw.get("finetune") if isinstance(raw.get("finetune"), dict) else {}
    in_distill = {(tuple(_dotted(err["loc"])[1:]), err["msg"]) for err in errors if _dotted(err["loc"])[:1] == ["distill"]}

    def echo(err: dict) -> bool:
        dotted = _dotted(err["loc"])
        if dotted[:1] != ["finetune"] or (tuple(dotted[1:]), err["msg"]) not in in_distill:
            return False
        return len(dotted) == 1 or dotted[1] not in finetune  # a section-wide check, or a key finetune inherits

    return [err for err in errors if not echo(err)] or errors
