"""Stage code dependencies, derived from the imports instead of remembered by hand.

A stage's code closure is its script plus every repo-local module the script imports, transitively
(imports inside functions included, with each package's `__init__.py`, since importing `a.b` runs
`a/__init__.py`). `check` compares that closure with the code entries of every stage's `deps` in each
pipeline's dvc.yaml; `write` replaces those entries with the closure, one file each, so an edit to any
file a stage runs flips that stage in `dvc status` and nothing else does.

Static analysis cannot follow a module imported by a name computed at run time, so a repo-local
`importlib.import_module` / `__import__` call is an error here rather than a silent hole.
"""
from __future__ import annotations

import ast
import functools
import os
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path

#: Where pipelines live: the embedded default at the root and one folder each under pipelines/.
PIPELINE_GLOBS = ("dvc.yaml", "pipelines/*/dvc.yaml", "pipelines/*/mini/dvc.yaml")


class DepsError(ValueError):
    """The import graph cannot be derived statically (a run-time import, a missing script)."""


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def relpath(path: str | Path, base: Path) -> str:
    """`path` relative to `base`, with `..` where it lies outside (a stage whose wdir is a sub-folder)."""
    return Path(os.path.relpath(Path(path).resolve(), base)).as_posix()


def _module_file(name: str, search: list[Path]) -> Path | None:
    """The repo-local file a dotted module name loads (a module or a package's __init__), if any."""
    parts = name.split(".")
    for base in search:
        stem = base.joinpath(*parts)
        for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _package_of(path: Path, root: Path) -> list[str]:
    """Package parts of a file inside the repo (['fewstep', 'sd'] for fewstep/families/t2i/x.py)."""
    return list(path.resolve().relative_to(root.resolve()).parts[:-1])


_PARSE_LOCK = threading.Lock()


def _parse(path: Path) -> ast.Module:
    """`ast.parse`, safe beside other threads. CPython 3.11 keeps the AST constructor's recursion depth
    per interpreter, not per thread, so two parses interleaved by a thread switch (a flow's task threads,
    or Prefect's own) fail with a spurious `SystemError: AST constructor recursion depth mismatch`
    (python/cpython#106905). Ours are serialized; a clash with a foreign thread's parse is retried."""
    source = path.read_text()
    with _PARSE_LOCK:
        try:
            return ast.parse(source, filename=str(path))
        except SystemError:  # a foreign thread's parse interleaved with ours: the tree itself is fine
            return ast.parse(source, filename=str(path))


def _imported_names(path: Path, root: Path) -> tuple[tuple[str, int], ...]:
    """Every module name a file may load, with its line: `import a.b` gives a.b; `from a import b`
    gives a and a.b (b may be a submodule); relative imports resolved against the file's package.
    Read once per version of the file: every stage's closure walks the same shared modules."""
    stat = path.stat()
    return _names_in_file(path.resolve(), root.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _names_in_file(path: Path, root: Path, mtime_ns: int, size: int) -> tuple[tuple[str, int], ...]:
    tree = _parse(path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, root)  # a module's package and an __init__'s are its folder
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append((base, node.lineno))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__"):
                raise DepsError(f"{_rel(path, root)}:{node.lineno}: imports a module by a run-time name; "
                                f"the stage dependency analysis cannot follow it (import it statically)")
    return tuple(names)


def _with_packages(file: Path, search_base: Path) -> list[Path]:
    """The file plus the __init__.py of every package above it, up to its search root."""
    out = [file]
    folder = file.parent
    while folder.resolve() != search_base.resolve() and search_base.resolve() in folder.resolve().parents:
        init = folder / "__init__.py"
        if init.is_file():
            out.append(init)
        folder = folder.parent
    return out


@dataclass
class Closure:
    """A script's repo-local code closure and, for each file, the import chain that reached it."""

    script: str
    files: dict[str, list[str]] = field(default_factory=dict)  # file -> chain of files from the script


def _loaded_by(module: Path, search: tuple[Path, ...], root: Path) -> list[tuple[str, Path]]:
    """(root-relative name, path) of every repo-local file that running `module` imports, with the
    __init__.py of each package above it."""
    loaded = []
    for name, _ in _imported_names(module, root):
        found = _module_file(name, list(search)) if name else None
        if found is None:
            continue
        base = next(b for b in search if b.resolve() in found.resolve().parents)
        loaded += [(_rel(file, root), file) for file in _with_packages(found, base)]
    return loaded


def closure(script: str | Path, root: str | Path, memo: dict | None = None) -> Closure:
    """Every repo-local file the script runs, following imports from the repo root and the script's own
    folder (Python puts it first on sys.path). `memo`: what each module loads, shared by the closures of
    one check (stages import the same modules; the files must not change while it is shared)."""
    root = Path(root).resolve()
    script = Path(script)
    script = (script if script.is_absolute() else root / script).resolve()
    if not script.is_file():
        raise DepsError(f"{script}: stage script not found")
    search = (script.parent, root)
    memo = {} if memo is None else memo
    result = Closure(_rel(script, root), {_rel(script, root): [_rel(script, root)]})
    queue = [script]
    if (script.parent / "__init__.py").is_file():  # a family's module named by --trainer/--family: imported by
        for init in _with_packages(script, root)[1:]:  # its dotted name, so its packages' __init__ run first
            result.files[_rel(init, root)] = [_rel(script, root), _rel(init, root)]
            queue.append(init)
    while queue:
        current = queue.pop()
        chain = result.files[_rel(current, root)]
        if (current, search) not in memo:
            memo[current, search] = _loaded_by(current, search, root)
        for rel, file in memo[current, search]:
            if rel not in result.files:
                result.files[rel] = chain + [rel]
                queue.append(file)
    return result


# ---- dvc.yaml side ---------------------------------------------------------------------------------

def pipeline_files(root: str | Path) -> list[Path]:
    """Every dvc.yaml, once: a pipeline whose dvc.yaml links to another's (pipelines/sd15 -> sdxl) adds nothing."""
    root, files = Path(root), {}
    for path in (p for pattern in PIPELINE_GLOBS for p in sorted(root.glob(pattern))):
        if path.resolve() not in files or files[path.resolve()].is_symlink():
            files[path.resolve()] = path
    return list(files.values())


def stage_scripts(cmd: str, base: Path) -> list[Path]:
    """The Python scripts a stage command runs: every `*.py` argument (after `python`, `torchrun`,
    `${run.launcher}` ...) that exists relative to the stage's working directory, or to the folder a
    `cd DIR &&` before it moves to (a pipeline project's stages run from the repository root)."""
    tokens = shlex.split(cmd) if isinstance(cmd, str) else [t for c in cmd for t in shlex.split(c)]
    scripts = []
    for i, token in enumerate(tokens):
        if token == "cd" and i + 1 < len(tokens):
            base = base / tokens[i + 1]
        elif token.endswith(".py") and "${" not in token and (base / token).is_file():
            scripts.append((base / token).resolve())
    return scripts


def _is_code_dep(dep: str, base: Path, root: Path, outs: set[str]) -> bool:
    """A deps entry that names code (a .py file, or a folder of them) rather than data or an output."""
    if "${" in dep:
        return False
    path = (base / dep).resolve()
    if not path.is_relative_to(root):
        return False
    if _rel(path, root) in outs:
        return False
    return dep.endswith(".py") or (path.is_dir() and any(path.rglob("*.py")))


@dataclass
class StageDeps:
    dvcfile: str
    stage: str
    base: Path                      # the stage's working directory
    declared: list[str]             # every deps entry, as written
    code: list[str]                 # the entries that name code
    expected: list[str]             # the closure, relative to base, script first
    chains: dict[str, list[str]]    # root-relative file -> import chain

    def covered(self, root: Path) -> set[str]:
        """Root-relative files the declared code entries cover (a folder covers every .py under it)."""
        files = set()
        for dep in self.code:
            path = (self.base / dep).resolve()
            files |= {_rel(p, root) for p in path.rglob("*.py")} if path.is_dir() else {_rel(path, root)}
        return files

    def problems(self, root: Path) -> list[str]:
        need = {_rel(self.base / e, root) for e in self.expected}
        have = self.covered(root)
        lines = []
        for missing in sorted(need - have):
            via = " -> ".join(self.chains[missing])
            lines.append(f"{self.dvcfile}: stage {self.stage}: missing dep {missing} (imported via {via})")
        for extra in sorted(have - need):
            lines.append(f"{self.dvcfile}: stage {self.stage}: dep {extra} is not imported by the stage "
                         f"(an edit to it would rerun the stage for nothing)")
        for dep in self.code:  # a folder would take in any module added to it later, imported or not
            if (self.base / dep).is_dir():
                lines.append(f"{self.dvcfile}: stage {self.stage}: dep {dep} is a folder; list the files it imports")
        return lines


def _load(dvcfile: Path):
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long cmd
    yaml.indent(mapping=2, sequence=4, offset=2)  # the style of our dvc.yaml files
    return yaml, yaml.load(dvcfile.read_text())


def stage_deps(dvcfile: str | Path, root: str | Path, memo: dict | None = None) -> list[StageDeps]:
    root = Path(root).resolve()
    memo = {} if memo is None else memo
    dvcfile = Path(dvcfile)
    dvcfile = dvcfile if dvcfile.is_absolute() else root / dvcfile
    _, doc = _load(dvcfile)
    stages = doc.get("stages") or {}
    out = []
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: its template
        base = (dvcfile.parent / stage.get("wdir", ".")).resolve()
        outs = {_rel(base / str(o if isinstance(o, str) else next(iter(o))), root)
                for s in stages.values() for o in (s.get("do", s).get("outs") or []) if "${" not in str(o)}
        declared = [str(d if isinstance(d, str) else next(iter(d))) for d in (stage.get("deps") or [])]
        scripts = stage_scripts(stage["cmd"], base)
        if not scripts:
            raise DepsError(f"{_rel(dvcfile, root)}: stage {name}: no Python script found in its cmd")
        chains: dict[str, list[str]] = {}
        for script in scripts:
            for file, chain in closure(script, root, memo).files.items():
                chains.setdefault(file, chain)
        script_rels = [_rel(s, root) for s in scripts]
        ordered = script_rels + sorted(f for f in chains if f not in script_rels)
        expected = [relpath(root / f, base) for f in ordered]
        code = [d for d in declared if _is_code_dep(d, base, root, outs)]
        out.append(StageDeps(_rel(dvcfile, root), name, base, declared, code, expected, chains))
    return out


def check(root: str | Path, dvcfiles: list[Path] | None = None) -> list[str]:
    """One line per stage dependency that the code's imports contradict; [] when every pipeline is exact."""
    root = Path(root).resolve()
    lines, memo = [], {}
    for dvcfile in dvcfiles or pipeline_files(root):
        for stage in stage_deps(dvcfile, root, memo):
            lines += stage.problems(root)
    return lines


def write(root: str | Path, dvcfiles: list[Path] | None = None) -> list[str]:
    """Rewrite each stage's code deps as its closure (data and output deps kept, after the code, in
    their order); comments elsewhere in the file survive. Returns the dvc.yaml files changed."""
    root = Path(root).resolve()
    changed, memo = [], {}
    for dvcfile in dvcfiles or pipeline_files(root):
        dvcfile = dvcfile if Path(dvcfile).is_absolute() else root / dvcfile
        stages = {s.stage: s for s in stage_deps(dvcfile, root, memo)}
        if not any(s.problems(root) for s in stages.values()):
            continue
        yaml, doc = _load(dvcfile)
        for name, stage in doc["stages"].items():
            info, stage = stages[name], stage.get("do", stage)
            data = [d for d in stage.get("deps") or [] if str(d if isinstance(d, str) else next(iter(d))) not in info.code]
            stage["deps"] = info.expected + data
        target = dvcfile.resolve()  # through a link: the file every linked pipeline shares
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "w") as f:
            yaml.dump(doc, f)
        tmp.replace(target)
        changed.append(_rel(dvcfile, root))
    return changed

