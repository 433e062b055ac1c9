"""Reading params.yaml as DVC does (YAML 1.2) and validating it into `Params`, every mistake one line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fewstep.params.markers import ParamsError
from fewstep.params.messages import known_keys_hint, one_line, own_errors
from fewstep.params.schema import Params


def validate(raw: Any) -> Params:
    """Validate a params mapping (every family's: `teacher.family` says which)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of stage sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = own_errors(exc.errors(), raw)
        line = one_line(errors[0])
        if errors[0]["type"] == "extra_forbidden":
            line += known_keys_hint(errors[0]["loc"], Params)
        others = [one_line(err) for err in errors[1:]]
        raise ParamsError(line + (f"; also {'; '.join(others)}" if others else "")) from None


def parse_yaml(text: str) -> Any:
    """YAML 1.2, as DVC reads params (so `1e-4` is a number and `yes` a string, as `dvc exp run -S` means
    them); PyYAML's YAML 1.1 would read `1e-4` as a string and `no` as false."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def load(path: str | Path = "params.yaml") -> Params:
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
        return validate(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
