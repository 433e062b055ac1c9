"""Merkle keys for pipeline stages, read off DVC's stage graph.

A stage's key is an xxh3-128 digest over
- its command (as DVC interpolates it),
- the xxh3 of every file in its code closure (the repo-local modules its script imports, fewstep.pipeline.deps),
- its params subset,
- the keys of the stages that produce its inputs (Merkle: a key names everything upstream of it, so it
  can be computed on a machine that has none of the upstream outputs), and
- the xxh3 of every other input (data, external model weights).
No version string stands in for code: a key changes exactly when something the stage reads changes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from fewstep.pipeline.deps import closure, relpath, stage_scripts
from fewstep.pipeline.hashing import Hasher
from fewstep.params import parse_yaml


@dataclass
class StageSpec:
    """What a stage key is made of, as read from DVC's stage graph (paths relative to the repo root)."""

    name: str
    cmd: str
    deps: list[str]
    params: list[str]       # dotted keys (a section name means the whole section)
    params_file: str
    outs: list[str]
    wdir: str = "."
    dvcfile: str = "dvc.yaml"
    uncached: list[str] = field(default_factory=list)  # outs DVC does not cache (metrics files)
    pool: str = "cpu"       # where Prefect places it: dvc.yaml `meta: {pool: gpu}` for training stages
    project: str = "."      # the DVC project holding the dvc.yaml (pipelines/<name> is its own project)
    always_changed: bool = False  # DVC runs it every time (an `inputs` stage: it records what no dep can name)

    @property
    def target(self) -> str:
        """How DVC commands name this stage when run in its project's folder."""
        dvcfile = Path(self.dvcfile).relative_to(self.project).as_posix()
        return self.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{self.name}"


def dvc_project(dvcfile: str | Path, root: str | Path = ".") -> str:
    """The DVC project a dvc.yaml belongs to, relative to the repository root: the nearest folder with a
    .dvc directory. The extra pipelines are projects of their own (`dvc init --subdir`), so the root
    project's `dvc status`, `metrics show` or `checkout` never see pipelines a user has not set up."""
    root = Path(root).resolve()
    folder = (root / dvcfile).parent.resolve()  # the file's own folder, even where it links to another's
    while folder != root and not (folder / ".dvc").is_dir() and root in folder.parents:
        folder = folder.parent
    return relpath(folder, root)


def _own_path(dvcfile: str | Path, root: Path) -> str:
    """A dvc.yaml's path relative to the root, as its pipeline names it (not the file a link points to)."""
    path = Path(dvcfile)
    return relpath(path.parent, root) + "/" + path.name if relpath(path.parent, root) != "." else path.name


def stage_specs(root: str | Path = ".", dvcfile: str | None = None) -> list[StageSpec]:
    """The pipeline's stages in run order, from DVC's own graph (no second hand-written list)."""
    import networkx as nx
    from dvc.repo import Repo

    root = Path(root).resolve()
    project = dvc_project(dvcfile or "dvc.yaml", root)
    repo = Repo(str(root / project))
    try:
        graph = repo.index.graph
        order = [s for s in reversed(list(nx.topological_sort(graph))) if hasattr(s, "cmd")]
        if dvcfile is not None:  # the pipeline's dvc.yaml and those below it (a *-digits pipeline's mini/)
            folder = (root / dvcfile).parent.absolute()
            order = [s for s in order if Path(s.path).parent.absolute() == folder or folder in Path(s.path).absolute().parents]
        specs = []
        for stage in order:
            deps, params, params_file = [], [], "params.yaml"
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    params += list(dep.params)
                    params_file = relpath(dep.fs_path, root)
                else:
                    deps.append(relpath(dep.fs_path, root))
            cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
            outs = [relpath(o.fs_path, root) for o in stage.outs]
            uncached = [relpath(o.fs_path, root) for o in stage.outs if not o.use_cache]
            pool = (stage.meta or {}).get("pool", "cpu")
            specs.append(StageSpec(stage.name, cmd, deps, params, params_file, outs, relpath(stage.wdir, root),
                                   _own_path(stage.path, root), uncached, pool, project, bool(stage.always_changed)))
        return specs
    finally:
        repo.close()


def params_subset(params: dict, keys: list[str], params_file: str = "params file") -> dict:
    out = {}
    for dotted in keys:
        node = params
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"params key {dotted!r} is declared in dvc.yaml but missing from {params_file}")
            node = node[part]
        out[dotted] = node
    return out


def producer(dep: str, specs: list[StageSpec]) -> StageSpec | None:
    """The stage whose output is (or contains) this input path."""
    for spec in specs:
        if any(dep == o or dep.startswith(o + "/") for o in spec.outs):
            return spec
    return None


class MissingInput(FileNotFoundError):
    """An input a stage reads does not exist: one line naming the path, the params key that sets it (if
    one does) and where the README says how to get it."""

    def __init__(self, dep: str, spec: StageSpec, params: dict):
        key = next((k for k, v in _flat(params) if v == dep), None)
        setting = f" (set by {key} in {spec.params_file})" if key else ""
        guide = 'README.md, "Data"' if spec.project == "." else 'pipelines/README.md, "Inputs"'
        super().__init__(f"{dep} not found: stage {spec.name} reads it{setting}; how to get it: {guide}")


def external_inputs(specs: list[StageSpec]) -> list[str]:
    """The files and folders stages read that no stage produces and that are not code: a teacher's weights, a
    prompts dataset."""
    return sorted({dep for spec in specs for dep in spec.deps if producer(dep, specs) is None
                   and not dep.endswith(".py")})


def missing_input(specs: list[StageSpec], root: str | Path = ".") -> MissingInput | None:
    """The first external input that does not exist: what the flow refuses to start without, and what the
    inputs stage checks first under DVC."""
    root = Path(root).resolve()
    external = set(external_inputs(specs))
    for spec in specs:
        for dep in spec.deps:
            if dep in external and not (root / dep).exists():
                return MissingInput(dep, spec, parse_yaml((root / spec.params_file).read_text()) or {})
    return None


def _flat(params, prefix: str = ""):
    for name, value in (params.items() if isinstance(params, dict) else ()):
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


@dataclass
class StageKey:
    key: str
    parts: dict = field(default_factory=dict)  # cmd, code, params, upstream, data: what the key covers


def code_closure(spec: StageSpec, root: Path, memo: dict | None = None) -> list[str]:
    """Root-relative files of the stage's code closure (its scripts and every repo-local import); `memo` as
    fewstep.pipeline.deps.closure takes it."""
    files: dict[str, None] = {}
    for script in stage_scripts(spec.cmd, root / spec.wdir):
        files.update(dict.fromkeys(closure(script, root, memo).files))
    return sorted(files)


def stage_key(spec: StageSpec, specs: list[StageSpec], keys: dict[str, StageKey], root: str | Path,
              hasher: Hasher, memo: dict | None = None) -> StageKey:
    """The Merkle key of one stage, given the keys of the stages before it. Raises on a missing input:
    a key that cannot be computed must fail the run, not disable caching."""
    root = Path(root).resolve()
    params_path = root / spec.params_file
    if not params_path.is_file():
        raise FileNotFoundError(f"{spec.params_file}: params file of stage {spec.name} not found")
    params = parse_yaml(params_path.read_text()) or {}
    code = code_closure(spec, root, memo)
    upstream, data = {}, {}
    for dep in spec.deps:
        if dep in code:
            continue
        made_by = producer(dep, specs)
        if made_by is not None and made_by.name != spec.name and made_by.always_changed:
            data[dep] = hasher.digest(root / dep, base=root)  # it ran already: what this stage reads of it
        elif made_by is not None and made_by.name != spec.name:
            upstream[dep] = keys[made_by.name].key
        elif (root / dep).suffix == ".py" and (root / dep).is_file():
            continue  # a code dep outside the closure: `fewstep deps --check` reports it; it is not read
        else:
            if not (root / dep).exists():
                raise MissingInput(dep, spec, params)
            data[dep] = hasher.digest(root / dep, base=root)
    if spec.always_changed:  # run before any key is computed (flows.distill.prepare_run): it is what it wrote
        for out in spec.outs:
            if not (root / out).exists():
                raise FileNotFoundError(f"{out}: output of stage {spec.name}, which runs before keys are computed, "
                                        f"is missing")
            data[out] = hasher.digest(root / out, base=root)
    parts = {"cmd": spec.cmd, "code": {f: hasher.file(root / f) for f in code},
             "params": params_subset(params, spec.params, spec.params_file), "upstream": upstream, "data": data}
    return StageKey(xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=str).encode()), parts)


def stage_keys(specs: list[StageSpec], root: str | Path, hasher: Hasher) -> dict[str, StageKey]:
    """Keys of every stage, in graph order."""
    keys: dict[str, StageKey] = {}
    memo: dict = {}  # the stages' closures share their modules
    for spec in specs:
        keys[spec.name] = stage_key(spec, specs, keys, root, hasher, memo)
    return keys
