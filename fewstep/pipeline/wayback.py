"""`fewstep checkout`: the way back to the last commit that never loses work and never recomputes.

`dvc checkout` restores each stage's outputs from the hashes dvc.lock names. A dvc.lock committed on another
machine type names outputs this machine never produced (float bits differ between CPU types), so `dvc checkout`
fails for every stage and leaves its output folders gone; `dvc repro` then recomputes them all, although DVC's
run-cache holds this machine's own outputs for the very same code and params: when a stage's deps match its
dvc.lock entry, DVC restores the lock's output hashes and never consults the run-cache (dvc/stage/cache.py,
`StageCache.restore`).

Here each stage, upstream first, comes back from the first of
1. the outputs dvc.lock names, when this machine's cache holds them (what `dvc checkout` does);
2. this machine's own run of the same command, code and params (DVC's run-cache, keyed by the deps as they are
   in the workspace, so a restored upstream output keys the stages below it); dvc.lock then records them;
3. nothing: the stage's current outputs stay as they are, and one line says `dvc repro` would recompute it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Restored:
    stage: str
    source: str  # "dvc.lock" | "run-cache" | "kept"

    def line(self) -> str:
        return {"dvc.lock": f"{self.stage}: the outputs dvc.lock names, from this machine's cache",
                "run-cache": f"{self.stage}: this machine's own outputs for the same code and params (DVC's "
                             f"run-cache); dvc.lock now names them",
                "kept": f"{self.stage}: neither dvc.lock's outputs nor a run of its code and params are in this "
                        f"machine's cache; its current outputs stay (`dvc repro` recomputes it)"}[self.source]


def checkout(project: Path) -> list[Restored]:
    """Bring every stage of the DVC project at `project` back to its dvc.lock entry without computing anything."""
    import logging

    import networkx as nx
    from dvc.repo import Repo

    results = []
    logging.getLogger("dvc").setLevel(logging.WARNING)  # its per-stage "Updating lock file": the lines below say it
    with Repo(str(project)) as repo, repo.lock:
        # DVC's graph points from a stage to the stages it depends on: reversed, upstream comes first
        for stage in reversed(list(nx.topological_sort(repo.index.graph))):
            if not stage.cmd or not stage.outs:
                continue
            results.append(Restored(stage.addressing, _restore(repo, stage)))
    return results


def _restore(repo, stage) -> str:
    if not stage.changed_deps() and stage.outs_cached():
        stage.checkout(force=True)
        return "dvc.lock"
    stage.save_deps()  # the deps as they are now (an upstream stage restored above included)
    cache = repo.stage_cache._load(stage)
    if cache:
        ran_here = repo.stage_cache._create_stage(cache, wdir=stage.wdir)
        if ran_here.outs_cached():
            with repo.stage_cache._cache_type_copy():  # metrics files (cache: false) land as plain copies
                ran_here.checkout(force=True)
            stage.save()
            stage.dump(update_pipeline=False)
            return "run-cache"
    return "kept"
