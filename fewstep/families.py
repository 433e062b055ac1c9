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


def load_trainer(path: Path):
    """The trainer module at `path`, imported under its dotted name (fewstep/sd/distill.py -> fewstep.sd.distill)
    so that it is the module the rest of the code imports. Python may import the package from another copy than
    the one the command names (a project whose PYTHONPATH points at a checkout); that is accepted only when the
    two files are byte-identical, so the code that runs is the code the stage's deps hash. One line otherwise."""
    file = Path(path).resolve()
    top = next((p for p in file.parents if (p / "fewstep" / "__init__.py").is_file()), None)
    name = ".".join(file.relative_to(top).with_suffix("").parts) if top is not None else ""
    module = None
    if file.is_file() and file.suffix == ".py" and name.startswith("fewstep."):
        try:
            module = pkgutil.resolve_name(name)
        except ImportError:
            module = None
    if module is None or not all(hasattr(module, attr) for attr in ("INPUTS", "launch", "train_stage")):
        sys.exit(f"--trainer {path}: not a fewstep trainer module (expected fewstep/distill.py or "
                 f"fewstep/sd/distill.py: a module with INPUTS, launch and train_stage)")
    imported = Path(module.__file__).resolve()
    if imported != file and imported.read_bytes() != file.read_bytes():
        sys.exit(f"--trainer {path}: Python imports {name} from {imported}, which differs from the named file "
                 f"(put the named file's project first on PYTHONPATH)")
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
