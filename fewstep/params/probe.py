"""A test probe: params that note every key a stage reads (the check that dvc.yaml lists them)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ReadRecorder:
    """Params (or a section of them) that note every dotted key read through them, for the check that each
    stage's dvc.yaml params cover what it reads (FEWSTEP_PARAMS_READS, tests/test_stages.py). Sections come back
    recorded; `model_copy(update=...)` gives a recorded copy that no longer notes the keys it replaced (their
    values were read, and noted, where they came from)."""

    def __init__(self, model: BaseModel, reads: set[str], key: str = "", given: dict | None = None):
        self._model, self._reads, self._key, self._given = model, reads, key, given or {}

    @property
    def __class__(self):  # isinstance() and `section.__class__.model_fields` see the section's own class
        return type(self._model)

    def __getattr__(self, name: str) -> Any:
        if name in self._given:
            return self._given[name]
        value = getattr(self._model, name)
        if name in type(self._model).model_fields:
            dotted = f"{self._key}.{name}" if self._key else name
            if isinstance(value, BaseModel):
                return ReadRecorder(value, self._reads, dotted)
            self._reads.add(dotted)
        elif name == "model_copy":
            def copy(update: dict | None = None, deep: bool = False) -> ReadRecorder:
                update = update or {}
                plain = {k: v._model if isinstance(v, ReadRecorder) else v for k, v in update.items()}
                given = {**self._given, **{k: v if isinstance(v, ReadRecorder) else plain[k] for k, v in update.items()}}
                return ReadRecorder(self._model.model_copy(update=plain, deep=deep), self._reads, self._key, given)
            return copy
        return value
