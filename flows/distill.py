"""Prefect flow `distill`: a DVC pipeline's stages as Prefect tasks, cached by Merkle keys in the team store.

- The stage graph comes from DVC (fewstep.pipeline.keys.stage_specs); stage code deps are checked against the
  imports first (fewstep.pipeline.deps), so no stale dvc.yaml can serve a stale result.
- Each stage's key is xxh3-128 over its command, its code closure's digests, its params subset, its
  upstream stages' keys and its other inputs' digests (fewstep.pipeline.keys). Keys and records (dvc.lock entry +
  xxh3 manifest, JSON — never pickles) live in the team store: `<DVC default remote>/fewstep/` on S3 or
  SSH, so every clone of the team shares them, or a local folder (FEWSTEP_CACHE_DIR / .fewstep/cache).
- Every stage is submitted at once, waiting for the stages it reads (Prefect futures): independent stages are
  looked up and sent to workers side by side; in one workspace DVC runs one stage at a time.
- A hit skips the stage. Outputs are fetched only where needed — inputs of a stage that must run here,
  and the final stages' outputs (`fetch="all"`: every stage's) — and verified against the manifest, as
  is every output already in the workspace; a record whose outputs cannot be restored intact is
  dropped from the store and its stage recomputed.
- A miss runs the stage through DVC's Python API (`Repo.reproduce` of the one stage, in a process of its
  own: fewstep.pipeline.repro; dvc.lock stays truthful), pushes its outputs
  and DVC's run-cache to the remote, and records it. With `placement="workers"` the miss runs on a
  Prefect worker instead: `fewstep-stage/gpu` for stages marked `meta: {pool: gpu}` in dvc.yaml,
  `fewstep-stage/cpu` for the rest (prefect.yaml; flows/stage.py).

Run it:  python flows/distill.py [--pipeline sdxl] [--set distill.lr=1e-4 ...] [--workers] [--fetch all]
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.states import Failed

from fewstep.files import write_atomic
from fewstep.pipeline import deps
from fewstep.pipeline.keys import StageSpec, missing_input, producer, stage_keys, stage_specs
from fewstep.pipeline.hashing import Hasher
from fewstep.pipeline.locking import lock_manager
from fewstep.params import parse_yaml
from fewstep.pipeline.stagerun import OutputsLost, StageError, StageRecord, compute, materialize, reproduce
from fewstep.pipeline.store import Store, StoreError, from_dvc, share_remote
from fewstep.pipeline.worktree import CheckoutError, clean_checkout, head

ROOT = Path(os.environ.get("FEWSTEP_ROOT", Path(__file__).resolve().parents[1])).resolve()


class PipelineError(ValueError):
    """A user mistake or missing input that stops the run before any stage: one line."""


def dvcfile_for(pipeline: str, root: Path = ROOT) -> str:
    if pipeline in ("default", "digits", ""):
        return "dvc.yaml"
    path = Path("pipelines") / pipeline / "dvc.yaml"
    if not (root / path).is_file():
        known = sorted(p.parent.name for p in (root / "pipelines").glob("*/dvc.yaml"))
        raise PipelineError(f"pipeline {pipeline!r} does not exist yet: no {path} "
                            f"(available: default{''.join(', ' + k for k in known)})")
    return str(path)


def apply_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Write dotted-key overrides into the params file, keeping its comments (DVC's own YAML editor,
    as `dvc exp run -S key=value` does)."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(params_file) as params:
        for dotted, value in overrides.items():
            node = params
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise PipelineError(f"override {dotted}: {key!r} is not a params section")
                node = node[key]
            if leaf not in node:
                raise PipelineError(f"override {dotted}: no such key in {params_file.name}")
            node[leaf] = value


@dataclass
class Run:
    """Everything a stage run needs to know about the pipeline in this clone."""

    root: Path
    pipeline: str
    dvcfile: str
    specs: list[StageSpec]
    keys: dict[str, str]
    store: Store
    params_before: str | None = None  # the params file before this run's overrides, put back at its end
    # one stage at a time runs DVC in this workspace (fetching inputs, computing): dvc.lock is one file, and
    # one machine's GPU is one device; lookups and stages sent to workers go side by side
    workspace: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def spec(self, name: str) -> StageSpec:
        return next(s for s in self.specs if s.name == name)

    def producers(self, spec: StageSpec) -> list[str]:
        """Stages whose outputs this stage reads, in graph order."""
        names = {made.name for d in spec.deps if (made := producer(d, self.specs)) and made.name != spec.name}
        return [s.name for s in self.specs if s.name in names]

    @cached_property
    def blocks(self):
        """(keys, results) blocks of the store. Prefect needs result storage saved server-side: the saved
        block holds the location and fsspec settings only, never credentials (fewstep.pipeline.store)."""
        import xxhash

        results = self.store.block("results")
        results.save(f"fewstep-results-{xxhash.xxh64_hexdigest(self.store.url.encode())}", overwrite=True)
        return self.store.block("keys"), results


def prepare_run(pipeline: str, root: Path = ROOT, params_text: str | None = None,
                overrides: dict[str, Any] | None = None) -> Run:
    """Read the pipeline from DVC, check its deps against the code, apply params, compute every key."""
    dvcfile = dvcfile_for(pipeline, root)
    mini = root / Path(dvcfile).parent / "mini" / "dvc.yaml"  # a *-digits pipeline's mini teacher stages
    problems = deps.check(root, [root / dvcfile] + ([mini] if mini.is_file() else []))
    if problems:
        raise PipelineError(f"{problems[0]} — stage deps are stale; run `fewstep deps --write`"
                            + (f" ({len(problems) - 1} more)" if len(problems) > 1 else ""))
    specs = stage_specs(root, dvcfile)
    params_file = root / specs[0].params_file
    before = params_file.read_text()
    if params_text is not None and before != params_text:
        write_atomic(params_file, params_text)
    try:
        if overrides:
            apply_overrides(params_file, overrides)
        run = _prepare(root, pipeline, dvcfile, specs)
    except BaseException:
        write_atomic(params_file, before)
        raise
    run.params_before = before if overrides or params_text not in (None, before) else None
    return run


def restore_params(run: "Run") -> bool:
    """Put back the params file a run's overrides changed (they apply to that run only, as
    `dvc exp run --temp` does). Returns whether there was anything to put back."""
    if run.params_before is None:
        return False
    write_atomic(run.root / run.specs[0].params_file, run.params_before)
    run.params_before = None
    return True


def _prepare(root: Path, pipeline: str, dvcfile: str, specs: list[StageSpec]) -> "Run":
    try:
        store = from_dvc(root)
        store.check()
        share_remote(root, specs[0].project)
    except StoreError as exc:
        raise PipelineError(str(exc)) from None
    missing = missing_input(specs, root)
    if missing is not None:
        raise PipelineError(str(missing))
    # a stage DVC runs every time (e.g. `inputs`) runs before any key is computed: its outputs are parts of later keys
    for spec in (s for s in specs if s.always_changed):
        try:
            reproduce(root, spec, log=lambda line: None)
        except StageError as exc:
            raise PipelineError(str(exc)) from None
    hasher = Hasher(root / ".fewstep" / "hash-memo.json")
    try:
        keys = {name: k.key for name, k in stage_keys(specs, root, hasher).items()}
    except FileNotFoundError as exc:
        raise PipelineError(str(exc)) from None
    except KeyError as exc:
        raise PipelineError(exc.args[0]) from None
    hasher.save()
    return Run(root, pipeline, dvcfile, specs, keys, store)


# ---- Prefect tasks over the store ------------------------------------------------------------------

def _key_from_argument(context, parameters) -> str:
    return parameters["key"]


def stage_task(run: Run, refresh: bool = False, lock: bool = True):
    """The cached stage task. `lock`: hold the key's lock while computing — a lease on the team's Prefect
    server, or this clone's lock file without one — so concurrent runs compute a key once and the others
    take its record; a run that only sends the work to a worker must not hold it (the worker takes it)."""
    keys, results = run.blocks
    isolation = {"isolation_level": "SERIALIZABLE", "lock_manager": lock_manager(run.root / ".fewstep" / "locks")}
    policy = CacheKeyFnPolicy(cache_key_fn=_key_from_argument, key_storage=keys, **(isolation if lock else {}))
    return run_stage.with_options(cache_policy=policy, persist_result=True, result_storage=results,
                                  result_serializer="json", refresh_cache=refresh)


def stored_record(run: Run, key: str) -> dict | None:
    """The record stored under a key (a StageRecord's JSON), or None (read through Prefect's own result store)."""
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    keys, results = run.blocks
    store = ResultStore(result_storage=results, metadata_storage=keys, serializer=JSONSerializer())
    return store.read(key).result if store.exists(key) else None


def drop_record(run: Run, key: str) -> None:
    """Forget a key whose outputs are lost, so every clone recomputes it instead of trusting it."""
    keys, _ = run.blocks
    if run.store.is_local:
        Path(keys._resolve_path(key)).unlink(missing_ok=True)
    elif keys.filesystem.exists(keys._resolve_path(key)):
        keys.filesystem.rm(keys._resolve_path(key))


@task(task_run_name="{stage}")
def run_stage(run: Run, stage: str, key: str, inputs: dict[str, dict], placement: str = "local",
              force: bool = False, params_text: str | None = None) -> dict:
    """Cache miss: compute the stage (in the run's workspace, or on a worker of its pool) and return its
    record. `run` is the calling flow's prepared pipeline (tasks execute in its process)."""
    logger = get_run_logger()
    if placement == "workers":
        return _on_worker(run, stage, key, inputs, force, params_text)
    with run.workspace:
        for name, record in inputs.items():
            try:
                how = materialize(run.root, run.spec(name), StageRecord.from_json(record), run.store,
                                  log=logger.debug, warn=logger.warning)
            except OutputsLost:
                drop_record(run, run.keys[name])
                raise
            logger.info(f"{stage}: input {name} {how}")
        return compute(run.root, run.spec(stage), run.store, force=force, log=logger.info).as_json()


def _on_worker(run: Run, stage, key, inputs, force, params_text) -> dict:
    from prefect.deployments import run_deployment

    pool = run.spec(stage).pool
    logger = get_run_logger()
    logger.info(f"{stage}: sending to a worker of pool {pool}")
    flow_run = run_deployment(name=f"fewstep-stage/{pool}", timeout=0,
                              parameters={"pipeline": run.pipeline, "stage": stage, "key": key, "inputs": inputs,
                                          "force": force, "params_text": params_text, "commit": head(run.root)})
    state = _follow(flow_run, f"{stage} on pool {pool}", logger.info)
    if state.is_crashed():
        raise StageError(f"stage {stage} on pool {pool} (flow run {flow_run.name}): "
                         f"{state.message or 'worker lost'}; start a worker on pool {pool} and rerun: "
                         f"finished stages are kept")
    if not state.is_completed():
        lost = re.match(r"stage (\S+): outputs in .* are incomplete or damaged", state.message or "")
        if lost:  # the worker could not restore one of the inputs: the parent recomputes it
            raise OutputsLost(lost.group(1), state.message)
        raise StageError(f"stage {stage} on pool {pool} (flow run {flow_run.name}): "
                         f"{state.name}: {state.message or 'no message'}")
    record = stored_record(run, key)
    if record is None:
        raise StageError(f"stage {stage} on pool {pool}: the worker finished but stored no record under its key "
                         f"in {run.store.describe()}")
    return record


PROGRESS_EVERY_S = 30.0


def _follow(flow_run, label: str, say) -> Any:
    """Wait for a flow run on a worker, relaying its log lines here as they arrive (and a line when it
    has been quiet for PROGRESS_EVERY_S), so a laptop shows what its stage does on the worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    started = last = time.monotonic()
    seen = 0
    with get_client(sync_client=True) as client:
        only_this = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
        while True:
            state = client.read_flow_run(flow_run.id).state
            logs = client.read_logs(log_filter=only_this, offset=seen, sort=LogSort.TIMESTAMP_ASC, limit=200)
            for log in logs:
                if log.level >= logging.INFO:  # a line each: a traceback there stays in the worker's log
                    say(f"[{label}] {log.message.splitlines()[0] if log.message else ''}")
            seen += len(logs)
            now = time.monotonic()
            if logs:
                last = now
            elif now - last >= PROGRESS_EVERY_S:
                say(f"[{label}] {state.name.lower()} for {now - started:.0f} s (flow run {flow_run.name})")
                last = now
            if state.is_final() and not logs:
                return state
            time.sleep(2)


# ---- the flow --------------------------------------------------------------------------------------

def failed(message: str):
    """End a flow run Failed with one line: in its state message and its log, the log sent before the state
    changes, so `prefect deployment run --watch` (which stops at the final state) prints it."""
    from prefect.logging.handlers import APILogHandler

    one_line_faults().told.add(message)
    get_run_logger().error(message)
    APILogHandler().flush()
    return Failed(message=message)


_ONE_LINE_FAULTS = ("StageError", "OutputsLost", "PipelineError", "StoreError")


class _OneLineFaults(logging.Filter):
    """A fault this flow explains in one line is told once: Prefect's traceback of it ("Task run failed with
    exception"), its "Finished in state Failed(...)" restatements and the deployment process's re-raise of
    the run's own Failed state are dropped (the state message keeps the line). `told`: the lines `failed`
    has told in this process."""

    def __init__(self):
        super().__init__()
        self.told: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (type(exc).__name__ in _ONE_LINE_FAULTS
                                or (type(exc).__name__ == "FailedRun" and str(exc) in self.told)):
            return False
        message = record.getMessage()
        if message.startswith(("Finished in state Failed(", "Finished in state Crashed(")):
            return not (any(name in message for name in _ONE_LINE_FAULTS) or any(m in message for m in self.told))
        return True


class _PrintedAtExit(logging.Filter):
    """On the console of `python flows/distill.py`, which prints the failure itself as its last line."""

    def __init__(self, faults: _OneLineFaults):
        super().__init__()
        self.faults = faults

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.faults.told


def one_line_faults() -> _OneLineFaults:
    """The filter on Prefect's run loggers, installed once: logging is process-wide, and so is what it holds."""
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    installed = next((f for f in loggers[0].filters if isinstance(f, _OneLineFaults)), None)
    if installed is None:
        installed = _OneLineFaults()
        for logger in loggers:
            logger.addFilter(installed)
    return installed


one_line_faults()  # on import: a task's failure is logged before any line of this module's flows runs


def _failure(state) -> str:
    exc = state.result(raise_on_failure=False)
    return str(exc) if isinstance(exc, BaseException) else (state.message or state.name)


@flow(name="distill", log_prints=True)
def distill(pipeline: str = "default", overrides: dict[str, Any] | None = None, placement: str = "local",
            fetch: str = "needed") -> dict[str, str]:
    """Run (or reuse) every stage of a pipeline, each once the stages it reads are done.

    Returns {stage: how}, each an `Outcome` value: cached, computed, up-to-date, restored or recomputed."""
    started = time.perf_counter()
    logger = get_run_logger()
    if placement not in ("local", "workers") or fetch not in ("needed", "all"):
        return failed(f"placement must be local|workers and fetch needed|all, got {placement!r}, {fetch!r}")
    try:
        with _workspace() as root:
            try:
                run = prepare_run(pipeline, root, overrides=overrides)
            except PipelineError as exc:  # a user mistake: one clear line in the run's state, not a traceback
                return failed(str(exc))
            try:
                return _distill(run, placement, fetch, started)
            finally:
                if restore_params(run) and root == ROOT:
                    logger.info(f"{run.specs[0].params_file} is as it was: --set applied to this run only (its "
                                f"outputs are in the workspace, so `dvc status` shows them changed; a plain run "
                                f"brings the others back)")
    except CheckoutError as exc:
        return failed(str(exc))


def _workspace():
    """This clone, or, for a run a worker took from a work pool (prefect.yaml sets FEWSTEP_ON_WORKER), a clean
    checkout of the clone: the worker's own clone is never written to."""
    from contextlib import nullcontext

    if not os.environ.get("FEWSTEP_ON_WORKER"):
        return nullcontext(ROOT)
    return _checkout_root(clean_checkout(ROOT, "flow"))


@contextmanager
def _checkout_root(checkout):
    with checkout as (root, commit):
        get_run_logger().info(f"workspace: {root} (commit {commit[:12]})")
        yield root


def _distill(run: Run, placement: str, fetch: str, started: float):
    logger = get_run_logger()
    logger.info(f"store: {run.store.describe()}; placement: {placement}")
    stages = Stages(run, placement, (run.root / run.specs[0].params_file).read_text())
    try:
        stages.obtain_all()
        wanted = stages.bring_outputs(fetch)
    except (StageError, StoreError, PipelineError) as exc:
        return failed(str(exc))
    logger.info(f"{len(run.specs)} stages in {time.perf_counter() - started:.2f} s of flow time")
    metrics = [run.root / o for s in wanted if s.name == "evaluate" for o in s.outs if o.endswith("metrics.json")]
    if metrics and metrics[0].is_file():
        _metrics_artifact(metrics[0], sorted((metrics[0].parent / "samples").glob("*.png")), stages.records)
    return {name: outcome.value for name, outcome in stages.report.items()}


class Outcome(str, Enum):
    """How a flow run obtained a stage (its report, {stage: outcome}, is the flow's result)."""

    CACHED = "cached"          # a stored record; outputs verified wherever they were needed
    COMPUTED = "computed"      # ran here or on a worker
    UP_TO_DATE = "up-to-date"  # no record, but DVC found the stage current (e.g. after `dvc pull`)
    RESTORED = "restored"      # a record whose local outputs were damaged: fetched again
    RECOMPUTED = "recomputed"  # a record whose outputs were lost everywhere: recomputed


@dataclass
class Stages:
    """One flow run's stages: each one's record, and how it was obtained ("cached", "computed", ...)."""

    run: Run
    placement: str
    params_text: str
    records: dict[str, StageRecord] = field(default_factory=dict)
    report: dict[str, Outcome] = field(default_factory=dict)

    def task(self, refresh: bool = False):
        return stage_task(self.run, refresh, lock=self.placement == "local")

    def obtain_all(self) -> None:
        """Every stage submitted at once, each waiting for the stages it reads (their futures, resolved by
        Prefect into the records it takes as inputs): independent stages are looked up, sent to workers and
        computed side by side. A stage whose input turned out lost is then obtained on its own (`obtain`)."""
        futures = {}
        for spec in self.run.specs:
            inputs = {name: futures[name] for name in self.run.producers(spec)}
            futures[spec.name] = self.task().submit(self.run, spec.name, self.run.keys[spec.name], inputs,
                                                    self.placement, params_text=self.params_text)
        try:
            for spec in self.run.specs:
                futures[spec.name].wait()
                state = futures[spec.name].state
                if self._take(spec, state):
                    continue
                exc = state.result(raise_on_failure=False) if state.is_failed() else None
                if state.is_failed() and not isinstance(exc, OutputsLost):
                    raise StageError(_failure(state))
                self.obtain(spec)  # an input lost (or its producer's): repaired one stage at a time
        finally:
            wait(list(futures.values()))  # none left running when the flow ends, failed or not

    def obtain(self, spec: StageSpec, refresh: bool = False) -> None:
        """Get the stage's record: a stored hit, or a computed miss (after fetching its inputs); an input
        whose outputs were lost (its record dropped) is recomputed first."""
        key = self.run.keys[spec.name]
        for attempt in range(3):
            inputs = {name: self.records[name].as_json() for name in self.run.producers(spec)}
            state = self.task(refresh)(self.run, spec.name, key, inputs, self.placement, force=refresh,
                                       params_text=self.params_text, return_state=True)
            if self._take(spec, state, refresh):
                return
            exc = state.result(raise_on_failure=False)
            if not isinstance(exc, OutputsLost) or exc.stage not in inputs or attempt == 2:
                raise StageError(_failure(state))
            get_run_logger().warning(f"{spec.name}: input {exc.stage} is lost from {self.run.store.describe()}; "
                                     f"recomputing it")
            self.obtain(self.run.spec(exc.stage), refresh=True)

    def _take(self, spec: StageSpec, state, refresh: bool = False) -> bool:
        """Keep a finished stage task's record; False when it gave none."""
        if not state.is_completed():
            return False
        key = self.run.keys[spec.name]
        if state.name != "Cached" and stored_record(self.run, key) is None:  # Prefect only logs write errors
            raise StageError(f"stage {spec.name}: computed, but its record could not be written to "
                             f"{self.run.store.describe()} (see the log above)")
        record = self.records[spec.name] = StageRecord.from_json(state.result())
        how = Outcome.CACHED if state.name == "Cached" else Outcome.COMPUTED if record.ran else Outcome.UP_TO_DATE
        self.report[spec.name] = Outcome.RECOMPUTED if refresh else how
        get_run_logger().info(f"{spec.name}: {self.report[spec.name].value} (key {key[:12]}, {record.where})")
        return True

    def bring_outputs(self, fetch: str) -> list[StageSpec]:
        """The final stages' outputs (`fetch` "all": every stage's), and every output this workspace already
        holds, verified here (so a damaged local copy is repaired rather than left to mislead `dvc status` or a
        later run); an output lost everywhere is recomputed. Returns the stages whose outputs are here."""
        run, logger = self.run, get_run_logger()
        consumers = {p for s in run.specs for p in run.producers(s)}
        wanted = [s for s in run.specs if fetch == "all" or s.name not in consumers
                  or any((run.root / rel).exists() for rel in self.records[s.name].manifest)]
        for spec in wanted:
            bring = lambda: materialize(run.root, spec, self.records[spec.name], run.store,  # noqa: E731
                                        log=logger.debug, warn=logger.warning)
            try:
                how = bring()
            except OutputsLost as exc:
                logger.warning(f"{exc}; recomputing {spec.name}")
                drop_record(run, run.keys[spec.name])
                self.obtain(spec, refresh=True)  # the stage run fetches and verifies its own inputs
                how = bring()
            if how == "restored" and self.report[spec.name] == Outcome.CACHED:
                self.report[spec.name] = Outcome.RESTORED  # a hit whose local copy was damaged
            logger.info(f"{spec.name}: outputs {how} and verified")
        return wanted


def _metrics_artifact(metrics_file: Path, grids: list[Path], records: dict[str, StageRecord]) -> None:
    """The evaluation as markdown: one row per model (every entry with an NFE), the metrics it has;
    then where each stage ran."""
    metrics = json.loads(metrics_file.read_text())
    models = {name: m for name, m in metrics.items() if isinstance(m, dict) and "nfe" in m}
    order = ["fid", "kid", "fid_t", "clip_score", "precision", "recall", "cond_accuracy", "pixel_w1", "nfe", "latency_ms"]
    keys = [k for k in order if any(k in m for m in models.values())]

    def cell(m: dict, key: str) -> str:
        value = f"{m.get(key, float('nan')):.4g}"
        interval = m.get(f"{key}_ci95")
        return value + (f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else "")

    rows = [f"| {name} | " + " | ".join(cell(m, k) for k in keys) + " |" for name, m in models.items()]
    table = "\n".join([f"| model | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|", *rows])
    floor = metrics.get("floor")
    notes = ([f"floor (held-out half vs half, {floor['num_images']} images): FID {floor['fid']:.4g}; the teacher "
              f"at that count {floor['teacher']['fid']:.4g}"] if floor else [])
    notes += ["[a, b]: 95% interval over sampling seeds", f"speedup: {metrics.get('speedup', float('nan')):.1f}x",
              *metrics.get("skipped", [])]
    where = "\n".join(f"| {name} | {r.where} | {r.seconds} |" for name, r in records.items())
    extra = "\n\n" + "; ".join(notes) + "\n\n| stage | computed on | seconds |\n|---|---|---|\n" + where + "\n"
    images = "".join(f"\n\n**{g.stem}**\n\n![{g.stem}](data:image/png;base64,{base64.b64encode(g.read_bytes()).decode()})"
                     for g in grids if g.is_file())
    create_markdown_artifact(key="evaluation", markdown=table + extra + images, description="fewstep evaluation")


def main() -> None:
    ap = argparse.ArgumentParser(description="Run a fewstep pipeline as a Prefect flow")
    ap.add_argument("--pipeline", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)")
    ap.add_argument("--workers", action="store_true", help="run cache misses on Prefect workers (pools cpu/gpu)")
    ap.add_argument("--fetch", choices=["needed", "all"], default="needed",
                    help="outputs to bring into this clone: the final stages' and what must run here (default), or all")
    args = ap.parse_args()
    for handler in logging.getLogger().handlers:  # Prefect's console handler
        handler.addFilter(_PrintedAtExit(one_line_faults()))
    overrides = {k: parse_yaml(v) for k, v in (s.split("=", 1) for s in args.set)}
    state = distill(args.pipeline, overrides or None, "workers" if args.workers else "local", args.fetch,
                    return_state=True)
    if state.is_failed():
        print(f"distill: error: {state.message}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(state.result(), indent=2))


if __name__ == "__main__":
    main()
