"""Files written atomically: a reader (or a killed writer's rerun) sees the old file or the new one, never half of
one. No torch: the pipeline machinery writes through it too."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path, sweep: bool = True):
    """Yield a temporary sibling path; on success it replaces `path`, on failure it is removed.

    Works for files and directories, so a failed stage never leaves a half-written output behind. `sweep`
    first removes temporaries a killed run left (a stage writes its outputs alone: DVC runs it once at a time);
    writers that may run side by side (a flow's tasks on dvc.lock, two flows on one memo) pass sweep=False.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp") if sweep else ():
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"{path}: stage wrote nothing")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: str | Path, text: str, sweep: bool = False) -> None:
    """`path` holds `text`, replaced in one step (see atomic_output)."""
    with atomic_output(path, sweep=sweep) as tmp:
        tmp.write_text(text)
