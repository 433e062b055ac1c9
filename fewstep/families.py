"""One stage script per training stage for every model family: the command names the family's trainer.

`stages/critic.py`, `stages/distill.py` and `stages/finetune.py` hold what a stage is (which params section,
which inputs it continues from, what it writes); the family's *trainer module* holds how its networks are built
and trained. dvc.yaml names the trainer by its file, so the map says which code runs and the dependency analysis
(fewstep.deps, which takes every `*.py` argument of a command as a script) follows it:

    python stages/distill.py --trainer fewstep/distill.py ...             the EDM family (digits, image folders)
    python ../../stages/distill.py --trainer ../../fewstep/sd/distill.py  text-to-image (SDXL, SD1.5, SD3)

A trainer module defines INPUTS (its upstream folders besides the stage's own), `launch` (start-up: params
schema, working directory) and `train_stage(params, settings, args, *, stage, out, device, generator, autocast,
student_dir, critic_dir, train_generator)`.
"""
from __future__ import annotations

import argparse
import pkgutil
import sys
from pathlib import Path
from typing import Callable

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the fewstep package


def load_trainer(path: Path):
    """The trainer module at `path` (a file of the fewstep package), imported under its own name so it is the
    module the rest of the code imports; one line if the file is not one."""
    file = Path(path).resolve()
    try:
        name = ".".join(file.relative_to(PACKAGE_ROOT).with_suffix("").parts)
        module = pkgutil.resolve_name(name) if file.suffix == ".py" and name.startswith("fewstep.") else None
    except (ValueError, ImportError):
        module = None
    if module is None or Path(module.__file__).resolve() != file or not all(
            hasattr(module, attr) for attr in ("INPUTS", "launch", "train_stage")):
        sys.exit(f"--trainer {path}: not a fewstep trainer module (expected fewstep/distill.py or "
                 f"fewstep/sd/distill.py: a module with INPUTS, launch and train_stage)")
    return module


def run_stage(stage: str, main: Callable, configure: Callable[[argparse.ArgumentParser], None]) -> None:
    """Start a shared training stage: read --trainer, add its inputs to the stage's arguments, and let the
    trainer's start-up run `main(params, args, device, trainer)`."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--trainer", type=Path, required=True)
    trainer = load_trainer(first.parse_known_args()[0].trainer)

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--trainer", type=Path, required=True, help="the model family's trainer module")
        for name, help in trainer.INPUTS.items():
            parser.add_argument(f"--{name}", type=Path, required=True, help=help)
        configure(parser)

    trainer.launch(stage, lambda params, args, device: main(params, args, device, trainer), arguments)
