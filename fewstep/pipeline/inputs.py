"""Optional inputs a stage reads from outside the repository (a CLIP model, an Inception featurizer, a folder
of captioned reference images): the params keys typed `InputPath` that are set, and their content digests.

DVC cannot list a dep that exists only when a param is set, so each pipeline with such keys has an `inputs`
stage (always run; it only hashes, memoized by size and mtime) that records the digests in one file per params
section (`inputs/<section>.json`); the stages that read the paths depend on their section's file. A changed model file reruns them; an unchanged one does not,
and the record is the same on every machine that holds the same files, so a colleague's outputs stay valid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field

from fewstep.errors import DataError
from fewstep.pipeline.hashing import Hasher

#: The type of such a params key: an optional local path (a model, a data folder), marked for `declared`.
InputPath = Annotated[str | None, Field(json_schema_extra={"input_path": True})]


def declared(section: BaseModel, prefix: str = "") -> dict[str, str | None]:
    """{dotted key: value} of every InputPath field, set or not, found by walking the params model."""
    found: dict[str, str | None] = {}
    for name, info in section.__class__.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("input_path"):
            found[f"{prefix}{name}"] = getattr(section, name)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):  # only paths are read
            value = getattr(section, name)
            if value is not None:
                found.update(declared(value, f"{prefix}{name}."))
    return found


def record(params: BaseModel, root: str | Path, hasher: Hasher) -> dict[str, dict]:
    """{dotted key: {"path", "xxh3"}} for every InputPath that is set; the digest covers the file's bytes, or
    each file's relative path and bytes for a folder. A set path that does not exist is one error line."""
    root = Path(root)
    out = {}
    for key, value in declared(params).items():
        if not value:
            continue
        path = Path(value) if Path(value).is_absolute() else root / value
        if not path.exists():
            raise DataError(f"{key}: {value} does not exist (a local path; empty the key to switch it off)")
        out[key] = {"path": value, "xxh3": hasher.digest(path)}
    return out
