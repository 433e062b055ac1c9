"""xxh3-128 digests of files, trees and output manifests — what both the stages (checkpoint
fingerprints) and the flow (cache keys, output verification) need. File digests are memoized by
(path, size, mtime) so a warm key costs a stat per file, not a read."""
from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

from fewstep.files import write_atomic

CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Hasher:
    """xxh3-128 of files and trees, memoized by (path, size, mtime_ns); the memo can persist as JSON."""

    def __init__(self, memo_file: str | Path | None = None):
        self.memo_file = Path(memo_file) if memo_file else None
        self.memo: dict[str, str] = {}
        if self.memo_file and self.memo_file.is_file():
            try:
                self.memo = json.loads(self.memo_file.read_text())
            except json.JSONDecodeError:
                self.memo = {}  # a damaged memo only costs rehashing

    def file(self, path: str | Path) -> str:
        st = os.stat(path)
        key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.memo:
            self.memo[key] = file_digest(path)
        return self.memo[key]

    def tree(self, path: str | Path) -> dict[str, str]:
        """{relative posix path: digest} for every file under `path` (or the file itself)."""
        path = Path(path)
        if path.is_file():
            return {path.as_posix(): self.file(path)}
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such file or directory")
        return {p.as_posix(): self.file(p) for p in sorted(path.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts}

    def digest(self, path: str | Path, base: str | Path | None = None) -> str:
        """One xxh3-128 over a file or folder: each file's path and bytes. Paths are relative to `base` (the
        repository root, where a file's place matters) or, without one, to `path` itself (a file: its name),
        so the same model copied elsewhere digests alike."""
        path = Path(path)
        if base is not None:
            base = Path(base).resolve()
            rel = lambda p: Path(os.path.relpath(Path(p).resolve(), base)).as_posix()
        else:
            rel = lambda p: Path(p).relative_to(path).as_posix() if path.is_dir() else path.name
        tree = {rel(p): d for p, d in self.tree(path).items()}
        return xxhash.xxh3_128_hexdigest(json.dumps(tree, sort_keys=True).encode())

    def save(self) -> None:
        if self.memo_file:
            write_atomic(self.memo_file, json.dumps(self.memo))


def manifest(outs: list[str], root: str | Path, hasher: Hasher) -> dict[str, str]:
    """{path relative to root: xxh3-128} for every file of the given outputs."""
    root = Path(root)
    out = {}
    for o in outs:
        for path, digest in hasher.tree(root / o).items():
            out[Path(path).relative_to(root).as_posix()] = digest
    return out


def verify(recorded: dict[str, str], root: str | Path) -> list[str]:
    """Files of a recorded manifest that are missing or whose bytes changed (rehashed, not memoized)."""
    root = Path(root)
    bad = []
    for rel, digest in recorded.items():
        path = root / rel
        if not path.is_file() or file_digest(path) != digest:
            bad.append(rel)
    return bad
