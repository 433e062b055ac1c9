"""One stage's outputs through DVC: compute them, publish them to the team remote, fetch them elsewhere.

A stage's *record* is what another machine needs to use its outputs without recomputing them:
its dvc.lock entry (DVC's md5 of every output, so `dvc pull` can fetch exactly those objects), an xxh3
manifest of every output file (checked after every fetch: a half-pushed or damaged output is never
taken as valid), and the bytes of small outputs DVC does not cache (`cache: false` metrics files).
Records are plain JSON; the Prefect flow stores them under the stage's Merkle key.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from fewstep.files import write_atomic
from fewstep.pipeline.keys import StageSpec
from fewstep.pipeline.hashing import Hasher, manifest, verify
from fewstep.pipeline.store import Store

INLINE_LIMIT = 1 << 20  # uncached outputs (metrics) travel inside the record up to this size


@dataclass
class StageRecord:
    """What another machine needs to use a stage's outputs without recomputing them (the module's first
    paragraph); stored as JSON under the stage's key (`as_json` / `from_json`)."""

    stage: str
    lock: dict                      # the stage's dvc.lock entry: DVC's md5 of every output
    manifest: dict[str, str]        # {output file: xxh3-128}, checked after every fetch
    inline: dict[str, str] = field(default_factory=dict)  # uncached small outputs (metrics): {path: text}
    ran: bool = False               # DVC ran its command (False: DVC found it current, or restored it from its run-cache)
    where: str = ""                 # host:workspace that made it
    seconds: float = 0.0

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StageRecord":
        return cls(**data)


class StageError(RuntimeError):
    """A stage could not run or publish, phrased as one line naming the stage (and the remote)."""


class OutputsLost(StageError):
    """A record's outputs cannot be restored intact from the remote or the local DVC cache."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def dvc(root: Path, *args: str, log: Callable[[str], None] = print) -> tuple[int, list[str]]:
    """Run a DVC command in `root`, streaming its lines to `log`; return (exit code, lines)."""
    return _stream(["dvc", *args], root, log)


def _stream(command: list[str], cwd: Path, log: Callable[[str], None]) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    for line in proc.stdout:
        line = line.rstrip().split("\r")[-1]
        if line:
            log(line)
            lines.append(line)
    return proc.wait(), lines


_UNREACHABLE = (re.compile(r'Could not connect to the endpoint URL: "(\w+://[^/"]+)'),
                re.compile(r"Connect call failed \('([\d.]+)', (\d+)\)"))


def _reason(lines: list[str], rc: int) -> str:
    """The most telling line of a failed DVC command: the server it could not reach, if that was the cause,
    else its last ERROR line."""
    for line in lines:
        for pattern in _UNREACHABLE:
            found = pattern.search(line)
            if found:
                where = ":".join(g for g in found.groups() if g) or "the server"
                return f"cannot connect to {where}: is the storage server up?"
    errors = [l for l in lines if l.startswith("ERROR")]
    text = (errors[-1] if errors else lines[-1] if lines else f"exit code {rc}").removeprefix("ERROR: ")
    return text.strip()


def _lock_file(root: Path, spec: StageSpec) -> Path:
    return root / Path(spec.dvcfile).with_suffix(".lock")


def lock_entry(root: Path, spec: StageSpec) -> dict:
    from dvc.utils.serialize import parse_yaml

    path = _lock_file(root, spec)
    lock = (parse_yaml(path.read_text(), str(path)) if path.is_file() else None) or {}
    return lock.get("stages", {}).get(spec.name) or {}


def write_lock_entry(root: Path, spec: StageSpec, entry: dict) -> None:
    """Put another machine's dvc.lock entry for this stage into ours, so DVC fetches and checks out exactly
    those outputs; `dvc status` then tells truthfully whether our deps match. Written as DVC's own lockfile
    writer does (its round-trip YAML: `dvc.dvcfile.Lockfile.dump_stages`), but to a temp file renamed into
    place, so a crash never leaves a half-written dvc.lock."""
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    path = _lock_file(root, spec)
    lock = (parse_yaml_for_update(path.read_text(), str(path)) if path.is_file() else None) or {"schema": "2.0"}
    lock["stages"] = lock.get("stages") or {}
    lock["stages"][spec.name] = entry
    write_atomic(path, dumps_yaml(lock))


def reproduce(root: Path, spec: StageSpec, force: bool = False, log: Callable[[str], None] = print) -> str:
    """Reproduce the stage through DVC's Python API in a process of its own (fewstep.pipeline.repro: its
    output streams to `log`); return what DVC did: "current", "restored" (from its run-cache) or "ran"."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "outcome.json"
        command = [sys.executable, "-m", "fewstep.pipeline.repro", spec.target, "--report", str(report)]
        rc, lines = _stream(command + (["--force"] if force else []), root / spec.project, log)
        if rc != 0 or not report.is_file():
            raise StageError(f"stage {spec.name}: dvc repro failed: {_reason(lines, rc)}")
        return json.loads(report.read_text())["outcome"]


def compute(root: Path, spec: StageSpec, store: Store, force: bool = False,
            log: Callable[[str], None] = print) -> StageRecord:
    """Run the stage through DVC (which keeps dvc.lock truthful and may find it current), publish its
    outputs and DVC's run-cache to the remote, and return its record."""
    started = time.perf_counter()
    outcome = reproduce(root, spec, force, log)
    record = StageRecord(spec.name, lock_entry(root, spec), manifest(spec.outs, root, Hasher()),
                         ran=outcome == "ran", where=f"{socket.gethostname()}:{root}",
                         seconds=round(time.perf_counter() - started, 2))
    for rel in spec.uncached:
        path = root / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.stat().st_size > INLINE_LIMIT:
                raise StageError(f"stage {spec.name}: {f.relative_to(root)} is not cached by DVC and too large "
                                 f"to share inline; mark it cache: true")
            record.inline[f.relative_to(root).as_posix()] = f.read_text()
    if store.remote:
        publish(root, spec, store, log)
    return record


def publish(root: Path, spec: StageSpec, store: Store, log: Callable[[str], None] = print) -> None:
    store.export_secrets()
    rc, lines = dvc(root / spec.project, "push", "--run-cache", spec.target, log=log)
    if rc != 0:
        raise StageError(f"stage {spec.name}: push to {store.describe()} failed: {_reason(lines, rc)} "
                         f"(its outputs are kept here: rerun to push them)")


def materialize(root: Path, spec: StageSpec, record: StageRecord, store: Store,
                log: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> str:
    """Make this workspace hold the record's outputs, verified against its manifest: 'present' (already
    here), 'fetched' (from the local DVC cache or the remote) or 'restored' (fetched in place of damaged
    or partial files that dvc.lock names as these very outputs). Raises OutputsLost when they cannot be restored
    intact; nothing unverified is left in place of the outputs."""
    bad = verify(record.manifest, root)
    if not bad:
        return "present"
    ours = lock_entry(root, spec)
    damaged = (ours.get("outs") == record.lock.get("outs")
               and any((root / rel).exists() for rel in record.manifest))
    if damaged:
        warn(f"{spec.name}: local outputs missing or damaged: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
             f"restoring them")
    elif _same_inputs(ours, record.lock) and any((root / rel).is_file() for rel in bad):
        # computed here from the same code, params and inputs, yet other bytes (run-to-run measurements,
        # float bits of another machine type): the team's record is kept, and said so
        warn(f"{spec.name}: this workspace computed other bytes for the same inputs ({len(bad)} files differ, e.g. "
             f"{bad[0]}); keeping the team's record, from {record.where or 'another run'}")
    write_lock_entry(root, spec, record.lock)
    for rel, text in record.inline.items():
        write_atomic(root / rel, text)
    store.export_secrets()
    if store.remote:
        rc, lines = dvc(root / spec.project, "pull", spec.target, log=log)
    else:
        rc, lines = dvc(root / spec.project, "checkout", "--force", spec.target, log=log)
    bad = verify(record.manifest, root)
    if bad:
        where = store.describe() if store.remote else "the local DVC cache"
        why = _reason(lines, rc) if rc != 0 else f"{len(bad)} files differ from the record, e.g. {bad[0]}"
        damaged_objects = _objects_of(root, spec, record, bad, store) if store.remote else []
        _discard(root, bad)
        if store.remote:
            _forget_remote_objects(record, store, damaged_objects)
        if damaged_objects:
            _forget_local_objects(root, spec, damaged_objects)
            warn(f"{spec.name}: {len(damaged_objects)} damaged objects removed from {store.describe()}; "
                 f"the recomputed ones are uploaded in their place")
        raise OutputsLost(spec.name, f"stage {spec.name}: outputs in {where} are incomplete or damaged ({why})")
    return "restored" if damaged else "fetched"


def _same_inputs(ours: dict, theirs: dict) -> bool:
    """Two dvc.lock entries of one stage made from the same command, deps and params."""
    return bool(ours) and all(ours.get(k) == theirs.get(k) for k in ("cmd", "deps", "params"))


def _objects_of(root: Path, spec: StageSpec, record: StageRecord, bad: list[str], store: Store) -> list[str]:
    """DVC's md5 object names behind the files that failed verification (dvc.lock for a file output, the
    `.dir` listing for a directory's files: from the local cache, or the remote when a failed pull left
    none here)."""
    import json

    from dvc.repo import Repo

    wanted, objects = set(bad), []
    with Repo(str(root / spec.project)) as repo:
        cache = repo.cache.local
        for out in record.lock.get("outs", []):
            md5 = out.get("md5", "")
            rel = os.path.normpath(Path(spec.wdir) / out["path"])
            if not md5.endswith(".dir"):
                objects += [md5] if rel in wanted else []
                continue
            try:
                listing = Path(cache.oid_to_path(md5))
                text = listing.read_text() if listing.is_file() else _remote_object(store, md5).decode()
                entries = json.loads(text)
            except (OSError, ValueError):  # no readable listing anywhere: only the .dir object itself goes
                continue
            objects += [e["md5"] for e in entries if f"{rel}/{e['relpath']}" in wanted]
    return objects


def _remote_object_path(store: Store, fs, md5: str) -> str:
    base = store.dvc_url if store.is_local else fs._strip_protocol(store.dvc_url)
    return f"{base}/files/md5/{md5[:2]}/{md5[2:]}"


def _remote_object(store: Store, md5: str) -> bytes:
    fs = store.filesystem()
    return fs.cat_file(_remote_object_path(store, fs, md5))


def _forget_remote_objects(record: StageRecord, store: Store, objects: list[str]) -> None:
    """Make the remote take the recomputed outputs again. DVC uploads only objects whose names the remote
    lacks, and trusts a directory's `.dir` object to mean all of its files are there: so the record's `.dir`
    objects and every object whose bytes were found damaged (present under its own name, rotted) are
    removed, and the recomputing clone's push uploads them afresh."""
    fs = store.filesystem()
    dirs = [o.get("md5", "") for o in record.lock.get("outs", []) if o.get("md5", "").endswith(".dir")]
    for md5 in dirs + objects:
        path = _remote_object_path(store, fs, md5)
        if fs.exists(path):
            fs.rm(path)


def _forget_local_objects(root: Path, spec: StageSpec, objects: list[str]) -> None:
    """Damaged objects pulled into this clone's DVC cache would be reused as they are: remove them."""
    from dvc.repo import Repo

    with Repo(str(root / spec.project)) as repo:
        for md5 in objects:
            Path(repo.cache.local.oid_to_path(md5)).unlink(missing_ok=True)


def _discard(root: Path, bad: list[str]) -> None:
    """Remove files that failed verification, so no unverified bytes pass for a stage's outputs."""
    for rel in bad:
        (root / rel).unlink(missing_ok=True)
