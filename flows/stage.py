"""Prefect flow `fewstep-stage`: compute one stage of a pipeline on this worker, in a clean checkout.

The `distill` flow sends a cache miss here when it runs with placement "workers" (deployments
`fewstep-stage/cpu` and `fewstep-stage/gpu` in prefect.yaml, one per work pool). The worker checks out the
requester's commit beside its clone (fewstep.pipeline.worktree: the clone itself is never written to, so updating a
worker is `git pull`), lays the requester's params over it, checks that it gives the same Merkle key (same
code, params and inputs — otherwise the result would not be what was asked for), fetches the stage's inputs
from the team remote, runs the stage through DVC, pushes its outputs and records it under the key.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from distill import ROOT, PipelineError, failed, prepare_run, stage_task
from fewstep.pipeline.stagerun import StageRecord
from fewstep.pipeline.worktree import CheckoutError, clean_checkout


@flow(name="fewstep-stage")
def stage(pipeline: str, stage: str, key: str, inputs: dict, force: bool = False, params_text: str | None = None,
          commit: str | None = None):
    logger = get_run_logger()
    try:
        with clean_checkout(ROOT, "stage", commit) as (root, at):
            try:
                run = prepare_run(pipeline, root, params_text=params_text)
                if run.keys[stage] != key:
                    raise PipelineError(
                        f"stage {stage}: this worker's checkout of {ROOT} (commit {at[:12]}) gives key "
                        f"{run.keys[stage][:12]}, the run asked for {key[:12]}: its code differs from the requester's; "
                        f"push the requester's commit to the team repository, or update the worker's clone (git pull)")
            except PipelineError as exc:
                return failed(str(exc))
            logger.info(f"{stage}: in {root} (commit {at[:12]})")
            state = stage_task(run, refresh=force)(run, stage, key, inputs, "local", force=force, return_state=True)
    except CheckoutError as exc:
        return failed(str(exc))
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        return failed(str(exc) if isinstance(exc, BaseException) else state.message)
    record = StageRecord.from_json(state.result())
    logger.info(f"{stage}: {'computed' if record.ran else 'current'} on {record.where}")
