"""Content addressing for stage outputs: xxh3-128 digests, output manifests and stage keys.

A stage key is an xxh3-128 digest over the stage command, the bytes of every dependency, the stage's
params subset and the fewstep version — Bazel's action key, read off DVC's stage graph. File digests
are memoized by (path, size, mtime) so a warm key costs a stat per file, not a read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import xxhash
import yaml

from . import __version__

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

    def save(self) -> None:
        if self.memo_file:
            self.memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.memo))
            os.replace(tmp, self.memo_file)


@dataclass
class StageSpec:
    """What a stage key is made of, as read from DVC's stage graph."""

    name: str
    cmd: str
    deps: list[str]
    params: list[str]       # dotted keys (a section name means the whole section)
    params_file: str
    outs: list[str]


def stage_specs(root: str | Path = ".", dvcfile: str | None = None) -> list[StageSpec]:
    """The pipeline's stages in run order, from DVC's own graph (no second hand-written list)."""
    import networkx as nx
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        graph = repo.index.graph
        order = [s for s in reversed(list(nx.topological_sort(graph))) if hasattr(s, "cmd")]
        if dvcfile is not None:
            wanted = Path(root, dvcfile).resolve()
            order = [s for s in order if Path(s.path).resolve() == wanted]
        specs = []
        for stage in order:
            deps, params, params_file = [], [], "params.yaml"
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    params += list(dep.params)
                    params_file = dep.def_path
                else:
                    deps.append(dep.def_path)
            cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
            specs.append(StageSpec(stage.name, cmd, deps, params, params_file, [o.def_path for o in stage.outs]))
        return specs
    finally:
        repo.close()


def params_subset(params: dict, keys: list[str]) -> dict:
    out = {}
    for dotted in keys:
        node = params
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"params key {dotted!r} is declared in dvc.yaml but missing from the params file")
            node = node[part]
        out[dotted] = node
    return out


def stage_key(spec: StageSpec, root: str | Path, hasher: Hasher) -> str:
    """xxh3-128 over (command, dependency bytes, params subset, fewstep version). Raises on any
    missing dependency: a key that cannot be computed must fail the run, not disable caching."""
    root = Path(root)
    params = yaml.safe_load((root / spec.params_file).read_text()) or {}
    payload = {"cmd": spec.cmd, "deps": manifest(spec.deps, root, hasher), "params": params_subset(params, spec.params),
               "fewstep": __version__}
    return xxhash.xxh3_128_hexdigest(json.dumps(payload, sort_keys=True, default=str).encode())


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
