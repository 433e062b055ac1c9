"""Stage start-up shared by every stage script: params, seeds, device, one-line user errors."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from fewstep.errors import DataError, TrainingDiverged
from fewstep.io import ArtifactError
from fewstep.params import EDM, FAMILY_NAMES, Params, ParamsError, ReadRecorder, load

USER_ERRORS = (ParamsError, DataError, ArtifactError, TrainingDiverged)


def device_for(params: Params) -> torch.device:
    want = params.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ParamsError("run.device is 'cuda' but no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(want)


def autocast(params: Params, device: torch.device):
    """Mixed precision on GPU per run.precision; a no-op on CPU (fp32 there keeps runs bit-reproducible)."""
    return autocast_factory(params, device)()


def autocast_factory(params: Params, device: torch.device):
    """A callable returning a fresh autocast context (what the trainer wraps each loss closure in)."""
    if device.type == "cpu" or params.run.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if params.run.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def pipeline_name(params_file: str) -> str:
    """The pipeline a params file configures: its folder's name under pipelines/, else "default"."""
    folder = Path(params_file).resolve().parent
    return folder.name if folder.parent.name == "pipelines" else "default"


def seeded(seed: int, salt: str) -> torch.Generator:
    """A generator per purpose, so adding a random draw in one place never shifts another's stream."""
    import zlib

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(salt.encode())) % 2**63)


def restore_previous_outputs() -> list[str]:
    """Under `dvc repro` / `dvc exp run`: put back the outputs dvc.lock records for this stage.

    DVC deletes a stage's outputs before running its command, so without this a params typo would destroy
    the last good result. They come back from DVC's own cache (the repository is unlocked while a stage
    command runs); dvc.lock still describes them, so `dvc status` stays truthful."""
    address, project = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not address or not project:
        return []
    from dvc.repo import Repo

    restored, cwd = [], os.getcwd()
    try:
        os.chdir(project)  # DVC_STAGE is relative to the project (the SD stages run from the repository root)
        with Repo(project) as repo:
            for stage in repo.stage.collect(address):
                for out in stage.outs:
                    if out.use_cache and out.hash_info:
                        out.checkout(force=True)
                        restored.append(out.def_path)
    except Exception as exc:  # noqa: BLE001 — best effort: the user's error line above is what matters
        print(f"could not restore the previous outputs from DVC's cache: {exc}", file=sys.stderr, flush=True)
    finally:
        os.chdir(cwd)
    return restored


def run(stage: str, main: Callable[[Params, argparse.Namespace, torch.device], None],
        configure: Callable[[argparse.ArgumentParser], None], families: tuple[str, ...] = EDM) -> None:
    """Parse the stage's arguments, validate params (whose teacher.family must be one of the stage code's
    `families`), run `main`, and turn user errors into one line."""
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    configure(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        params = load(args.params)
        if params.family not in families:
            raise ParamsError(f"{args.params}: teacher.family is {params.family}, but this stage's module (named in "
                              f"its command) serves {FAMILY_NAMES[families]}")
        reads_dir = os.environ.get("FEWSTEP_PARAMS_READS")  # the test that dvc.yaml lists what each stage reads
        if reads_dir:
            reads: set[str] = set()
            params = ReadRecorder(params, reads)
        if params.run.num_threads:
            torch.set_num_threads(params.run.num_threads)
        torch.manual_seed(params.seed)
        device = device_for(params)
        precision = params.run.precision  # autocast's: CPU runs always compute in fp32
        if device.type == "cpu" and precision != "fp32":
            precision = f"fp32 (run.precision {precision} applies on GPUs)"
        print(f"[{stage}] device={device} precision={precision} seed={params.seed}", flush=True)
        main(params, args, device)
        if reads_dir:
            Path(reads_dir, f"{stage}.json").write_text(json.dumps(sorted(reads), indent=1) + "\n")
    except USER_ERRORS as exc:
        print(f"[{stage}] error: {exc}", file=sys.stderr, flush=True)
        restored = restore_previous_outputs()
        if restored:
            print(f"[{stage}] kept the previous outputs ({', '.join(restored)}); fix the error and rerun",
                  file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from whatever loop was running
        seconds = time.perf_counter() - started
        restored = restore_previous_outputs()  # DVC deleted them before the run; checkpoints live elsewhere
        kept = f"kept the previous outputs ({', '.join(restored)})" if restored else "nothing written"
        print(f"[{stage}] interrupted after {seconds:.0f} s: {kept}; a training stage resumes from its last "
              f"checkpoint on the next run", file=sys.stderr, flush=True)
        sys.exit(130)
    print(f"[{stage}] done in {time.perf_counter() - started:.1f} s", flush=True)
