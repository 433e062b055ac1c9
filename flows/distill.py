"""Prefect flow `distill`: run a DVC pipeline's stages as Prefect tasks with a content-addressed cache.

- The stage graph comes from DVC (fewstep.cache.stage_specs); nothing here lists stages by hand.
- Each stage's cache key is xxh3-128 over its command, dependency bytes, params subset and the fewstep
  version. A miss runs the stage through `dvc repro --single-item`, so dvc.lock stays truthful, and
  records an xxh3 manifest of its outputs. A hit skips the stage and verifies the outputs against the
  manifest; missing or corrupted files are named, restored with `dvc checkout` or recomputed.
- Keys and results persist under FEWSTEP_CACHE_DIR (default .fewstep/cache) — point several clones or
  machines at one shared directory to share them. Per-key file locks make concurrent runs compute each
  stage once.

Run it:  python flows/distill.py [--pipeline sdxl] [--set distill.lr=1e-4 ...]
"""
from __future__ import annotations

import argparse
import functools
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.filesystems import LocalFileSystem
from prefect.locking.filesystem import FileSystemLockManager
from prefect.states import Failed

from fewstep.cache import Hasher, manifest, stage_key, stage_specs, verify

ROOT = Path(os.environ.get("FEWSTEP_ROOT", Path(__file__).resolve().parents[1]))


def cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE_DIR", ROOT / ".fewstep" / "cache")).resolve()


def dvcfile_for(pipeline: str) -> str:
    if pipeline in ("default", "digits", ""):
        return "dvc.yaml"
    path = Path("pipelines") / pipeline / "dvc.yaml"
    if not (ROOT / path).is_file():
        known = sorted(p.parent.name for p in (ROOT / "pipelines").glob("*/dvc.yaml"))
        raise ValueError(f"pipeline {pipeline!r} does not exist yet: no {path} "
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
                    raise ValueError(f"override {dotted}: {key!r} is not a params section")
                node = node[key]
            if leaf not in node:
                raise ValueError(f"override {dotted}: no such key in {params_file.name}")
            node[leaf] = value


def _dvc(*args: str) -> str:
    """Run a DVC command, streaming its output into the Prefect logs; return that output."""
    logger = get_run_logger()
    lines = []
    proc = subprocess.Popen(["dvc", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        line = line.rstrip().split("\r")[-1]
        if line:
            logger.info(line)
            lines.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed with exit code {proc.returncode}")
    return "\n".join(lines)


def _key_from_argument(context, parameters) -> str:
    return parameters["key"]


@functools.lru_cache(maxsize=None)
def _result_storage(storage: Path) -> LocalFileSystem:
    """Prefect needs result storage saved server-side: one LocalFileSystem block per cache directory."""
    import xxhash

    block = LocalFileSystem(basepath=str(storage / "results"))
    block.save(f"fewstep-results-{xxhash.xxh64_hexdigest(str(storage).encode())}", overwrite=True)
    return block


def _stage_task(refresh: bool = False):
    storage = cache_dir()
    policy = CacheKeyFnPolicy(cache_key_fn=_key_from_argument, key_storage=storage / "keys",
                              isolation_level="SERIALIZABLE",
                              lock_manager=FileSystemLockManager(lock_files_directory=storage / "locks"))
    return run_stage.with_options(cache_policy=policy, persist_result=True, refresh_cache=refresh,
                                  result_storage=_result_storage(storage))


@task(task_run_name="{stage}")
def run_stage(stage: str, target: str, outs: list[str], key: str, force: bool = False) -> dict:
    """Cache miss: run the stage through DVC (which itself skips a stage dvc.lock shows up to date,
    e.g. after `dvc pull`) and return the xxh3 manifest of its outputs and whether it really ran."""
    log = _dvc("repro", "--single-item", *(["--force"] if force else []), target)
    return {"manifest": manifest(outs, ROOT, Hasher()), "ran": "Running stage" in log}


def _metrics_artifact(metrics_file: Path, grids: list[Path]) -> None:
    """The evaluation as markdown: one row per model (every entry with an NFE), the metrics it has."""
    metrics = json.loads(metrics_file.read_text())
    models = {name: m for name, m in metrics.items() if isinstance(m, dict) and "nfe" in m}
    order = ["fid", "clip_score", "precision", "recall", "cond_accuracy", "nfe", "latency_ms"]
    keys = [k for k in order if any(k in m for m in models.values())]
    rows = [f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4g}" for k in keys) + " |"
            for name, m in models.items()]
    table = "\n".join([f"| model | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|", *rows])
    notes = [f"data floor FID: {metrics['data_floor']['fid']:.4g}"] if "data_floor" in metrics else []
    notes += [f"speedup: {metrics.get('speedup', float('nan')):.1f}x", *metrics.get("skipped", [])]
    extra = "\n\n" + "; ".join(notes) + "\n"
    images = "".join(f"\n\n**{g.stem}**\n\n![{g.stem}](data:image/png;base64,{base64.b64encode(g.read_bytes()).decode()})"
                     for g in grids if g.is_file())
    create_markdown_artifact(key="evaluation", markdown=table + extra + images, description="fewstep evaluation")


@flow(name="distill", log_prints=True)
def distill(pipeline: str = "default", overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Run (or reuse) every stage of a pipeline in graph order.

    Returns {stage: how}: "cached" (Prefect cache hit, outputs verified), "computed" (ran), "up-to-date"
    (cache miss but DVC found the stage current, e.g. after `dvc pull`), "restored" (hit with damaged
    outputs, restored from the DVC cache) or "recomputed" (damaged and not restorable)."""
    started = time.perf_counter()
    logger = get_run_logger()
    try:
        dvcfile = dvcfile_for(pipeline)
        specs = stage_specs(ROOT, dvcfile)
        if overrides:
            apply_overrides(ROOT / specs[0].params_file, overrides)
    except ValueError as exc:  # a user mistake: one clear line in the run's state, not a traceback
        logger.error(str(exc))
        return Failed(message=str(exc))
    hasher = Hasher(cache_dir() / "hash-memo.json")
    report = {}
    for spec in specs:
        key = stage_key(spec, ROOT, hasher)  # raises on failure: no silent fallback to "no cache"
        target = spec.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{spec.name}"
        state = _stage_task()(spec.name, target, spec.outs, key, return_state=True)
        result = state.result()
        recorded, cached = result["manifest"], state.name == "Cached"
        bad = verify(recorded, ROOT)
        if bad and cached:
            logger.warning(f"{spec.name}: cached outputs missing or corrupted: {', '.join(bad)}; restoring")
            subprocess.run(["dvc", "checkout", "--force", target], cwd=ROOT, capture_output=True)
            bad = verify(recorded, ROOT)
            if bad:
                logger.warning(f"{spec.name}: not restorable from the DVC cache ({', '.join(bad)}); recomputing")
                recorded = _stage_task(refresh=True)(spec.name, target, spec.outs, key, force=True)["manifest"]
                bad = verify(recorded, ROOT)
                report[spec.name] = "recomputed"
            else:
                report[spec.name] = "restored"
        else:
            report[spec.name] = "cached" if cached else "computed" if result["ran"] else "up-to-date"
        assert not bad, f"{spec.name}: outputs do not match their manifest after recompute: {bad}"
        logger.info(f"{spec.name}: {report[spec.name]} (key {key[:12]})")
    hasher.save()
    logger.info(f"{len(specs)} stages in {time.perf_counter() - started:.2f} s of flow time")
    metrics = [ROOT / o for s in specs for o in s.outs if o.endswith("metrics.json")]
    if metrics and metrics[0].is_file():
        _metrics_artifact(metrics[0], sorted((metrics[0].parent / "samples").glob("*.png")))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the fewstep pipeline as a Prefect flow")
    ap.add_argument("--pipeline", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    state = distill(args.pipeline, overrides or None, return_state=True)
    if state.is_failed():
        print(f"distill: error: {state.message}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(state.result(), indent=2))


if __name__ == "__main__":
    main()
