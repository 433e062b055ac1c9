"""Clean checkouts where a worker runs what it is sent, so the worker's own clone is never written to.

A worker's clone belongs to its machine: updating it is `git pull`, and runs must not leave edited params or
a rewritten dvc.lock behind. Each stage (and each orchestrating flow run a worker takes from a deployment)
runs in a checkout beside the worker's caches: a `git clone --shared` of the clone, reset to the commit the
requester runs (or the clone's HEAD if that commit cannot be found), with every tracked file as committed;
the params the run sent are then written over it. A checkout keeps its outputs and DVC cache between runs,
like any workspace (every output is verified against its record before use), and takes the clone's DVC
credentials (`.dvc/config.local`). One run at a time uses a checkout (a file lock), so two runs on one
worker machine never reset each other's files.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import xxhash

from fewstep.files import atomic_output


class CheckoutError(RuntimeError):
    """The worker could not make its clean checkout, phrased as one line."""


def checkout_dir(root: Path, purpose: str) -> Path:
    """Where a clone's checkouts for `purpose` ("stage" or "flow") live: under the user's cache, not inside the
    clone (DVC and git would see them there)."""
    root = Path(root).resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fewstep" / "checkouts"
    return base / f"{root.name}-{xxhash.xxh64_hexdigest(str(root).encode())[:8]}-{purpose}"


def head(root: Path) -> str | None:
    """The commit a clone has checked out, or None outside git."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or None


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def _has(repo: Path, commit: str) -> bool:
    return _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode == 0


@contextmanager
def clean_checkout(root: Path, purpose: str, commit: str | None = None) -> Iterator[tuple[Path, str]]:
    """Hold the clone's checkout for `purpose`, reset to `commit` (else the clone's HEAD); yields (path, commit)."""
    root = Path(root).resolve()
    dest = checkout_dir(root, purpose)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".git").exists():
            with atomic_output(dest) as tmp:  # under the lock: no other writer of dest, so stale temporaries go
                made = _git(root, "clone", "-q", "--shared", "--no-checkout", str(root), str(tmp))
                if made.returncode != 0:
                    raise CheckoutError(f"cannot make a checkout of {root} in {dest}: {made.stderr.strip()}")
        _git(dest, "fetch", "-q", "origin")  # the clone's commits (shared objects: nothing is copied)
        if commit and not _has(dest, commit):
            upstream = _git(root, "remote", "get-url", "origin").stdout.strip()
            if upstream:  # the team's repository, where the requester pushed
                _git(dest, "fetch", "-q", upstream, commit)
        target = commit if commit and _has(dest, commit) else head(root)
        moved = _git(dest, "checkout", "-q", "--detach", "--force", target)
        if moved.returncode != 0:
            raise CheckoutError(f"cannot check out {target} in {dest}: {moved.stderr.strip()}")
        local = root / ".dvc" / "config.local"
        if local.is_file():
            shutil.copyfile(local, dest / ".dvc" / "config.local")
        yield dest, target
