"""Prefect flow `fewstep-stage`: compute one stage of a pipeline on this worker, in this worker's clone.

The `distill` flow sends a cache miss here when it runs with placement "workers" (deployments
`fewstep-stage/cpu` and `fewstep-stage/gpu` in prefect.yaml, one per work pool). The worker takes the
requester's params, checks that its own clone gives the same Merkle key (same code, params and
inputs — otherwise the result would not be what was asked for), fetches the stage's inputs from the
team remote, runs the stage through DVC, pushes its outputs and records it under the key.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from prefect import flow, get_run_logger

from distill import PipelineError, failed, prepare_run, stage_task


def _commit(root) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


@flow(name="fewstep-stage")
def stage(pipeline: str, stage: str, key: str, inputs: dict, force: bool = False, params_text: str | None = None):
    logger = get_run_logger()
    params_file = None
    try:
        params_file = _params_file(pipeline)
        previous = params_file.read_text()
        return _run(pipeline, stage, key, inputs, force, params_text, logger)
    finally:  # this clone is the worker's own: leave its params as they were (git pull keeps working)
        if params_file is not None and params_file.read_text() != previous:
            params_file.write_text(previous)


def _params_file(pipeline: str) -> Path:
    from distill import ROOT, dvcfile_for

    return ROOT / Path(dvcfile_for(pipeline)).parent / "params.yaml"


def _run(pipeline, stage, key, inputs, force, params_text, logger):
    try:
        run = prepare_run(pipeline, params_text=params_text)
        if run.keys[stage] != key:
            raise PipelineError(f"stage {stage}: this worker's clone ({run.root}, commit {_commit(run.root)}) gives key "
                                f"{run.keys[stage][:12]}, the run asked for {key[:12]}: its code differs from the "
                                f"requester's; update the clone (git pull) and restart the worker")
    except PipelineError as exc:
        return failed(str(exc))
    state = stage_task(run, refresh=force)(pipeline, stage, key, inputs, "local", force=force, return_state=True)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        return failed(str(exc) if isinstance(exc, BaseException) else state.message)
    logger.info(f"{stage}: {'computed' if state.result()['ran'] else 'current'} on {state.result()['where']}")
