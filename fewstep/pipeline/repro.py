"""Reproduce one DVC stage through DVC's Python API and report what DVC did with it.

    python -m fewstep.pipeline.repro TARGET --report FILE [--force]    (in the stage's DVC project)

does what `dvc repro --single-item TARGET` does (`Repo.reproduce`) and writes {"outcome": ...} to FILE:
"current" (DVC found the stage up to date), "restored" (DVC put back its outputs from its run-cache) or "ran"
(DVC ran its command). `Repo.reproduce` returns the stage both when it ran and when it was restored, so this
repository's run-cache lookup (`StageCache.restore`, which DVC calls before it runs any command and which
raises when it finds nothing to restore) tells the two apart. It runs in a process of its own, so the stage
command's output streams to whoever started it: the flow relays it to the Prefect log, where a worker's
stages reach the laptop.
On failure it prints one `ERROR:` line (DVC's message and its causes) and exits with 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def reproduce(target: str, force: bool = False) -> str:
    """Reproduce `target` in the DVC project of the working directory; return its outcome."""
    from dvc.repo import Repo

    restored = False
    with Repo() as repo:
        restore = repo.stage_cache.restore

        def restore_and_tell(stage, *args, **kwargs):  # DVC asks its run-cache before it runs a command
            nonlocal restored
            restore(stage, *args, **kwargs)  # raises RunCacheNotFoundError when DVC must run the command
            restored = True

        repo.stage_cache.restore = restore_and_tell
        reproduced = repo.reproduce(target, single_item=True, force=force)
    return "current" if not reproduced else "restored" if restored else "ran"


def _one_line(error: BaseException) -> str:
    """DVC's error and its causes on one line, as its CLI prints them."""
    parts = []
    while error is not None:
        parts.append(str(error) or type(error).__name__)
        error = error.__cause__
    return ": ".join(dict.fromkeys(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fewstep.pipeline.repro", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="the stage, as dvc repro takes it (name, or dvc.yaml:name)")
    parser.add_argument("--report", type=Path, required=True, help="where to write {\"outcome\": ...}")
    parser.add_argument("--force", action="store_true", help="run the command even if the stage is current")
    args = parser.parse_args(argv)

    from dvc.exceptions import DvcException  # importing dvc sets up its log lines as its CLI prints them

    try:
        outcome = reproduce(args.target, args.force)
    except DvcException as error:
        print(f"ERROR: {_one_line(error)}", flush=True)
        return 1
    args.report.write_text(json.dumps({"outcome": outcome}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
