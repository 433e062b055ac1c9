"""One stage script per shared stage for every model family: the command names the family's module.

`stages/trajectories.py`, `stages/critic.py`, `stages/distill.py`, `stages/finetune.py` and `stages/evaluate.py`
hold what a stage is (which params section, which inputs it continues from, what it writes); a family's module
holds how its networks are loaded, built, run and scored. dvc.yaml names the module by its file, so the map says
which code runs and the dependency analysis (fewstep.pipeline.deps, which takes every `*.py` argument of a command as a
script) follows it:

    python stages/distill.py --trainer fewstep/families/edm/edm_trainer.py ...                  the EDM family (digits, image folders)
    python ../../stages/distill.py --trainer ../../fewstep/families/t2i/t2i_trainer.py       text-to-image (SDXL, SD1.5, SD3)
    python stages/trajectories.py --family fewstep/families/edm/edm_trajectories.py ...         the teacher's ODE solves, EDM
    python ../../stages/trajectories.py --family ../../fewstep/families/t2i/t2i_trajectories.py   ... text-to-image
    python stages/evaluate.py --family fewstep/families/edm/edm_evaluation.py ...                 scoring, EDM (t2i/t2i_evaluation.py: text-to-image)

Every kind defines INPUTS (their upstream folders besides the stage's own) and `launch` (start-up: params, which
must be of the module's families, working directory). A trainer adds `train_stage(params, settings, args, *, stage, out, device, generator,
autocast, student_dir, critic_dir, train_generator)`; a teacher-solve module `teacher_splits(params, args,
device) -> (teacher, noise_shape, [fewstep.core.sampling.TeacherSplit])`; an evaluation module `evaluation(params,
args, device) -> fewstep.core.evaluation.Evaluation`. Each stage has its own kind of module so that its closure is the
code it runs: a change to training code does not re-solve the teacher's ODE nor re-score the student.
"""
from __future__ import annotations

import argparse
import pkgutil
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from fewstep.core import parallel, runtime


class ModuleKind(NamedTuple):
    """A kind of family module: the stage's flag naming it, what it is, what it must define, which files are one."""

    flag: str
    what: str
    api: tuple[str, ...]
    expected: str


TRAINER = ModuleKind("--trainer", "trainer", ("INPUTS", "launch", "train_stage"),
                     "fewstep/families/edm/edm_trainer.py or fewstep/families/t2i/t2i_trainer.py")
TEACHER_SOLVES = ModuleKind("--family", "teacher-solve", ("INPUTS", "launch", "teacher_splits"),
                            "fewstep/families/edm/edm_trajectories.py or fewstep/families/t2i/t2i_trajectories.py")
EVALUATION = ModuleKind("--family", "evaluation", ("INPUTS", "launch", "evaluation"),
                        "fewstep/families/edm/edm_evaluation.py or fewstep/families/t2i/t2i_evaluation.py")


def load_module(path: Path, kind: ModuleKind = TRAINER):
    """The family module at `path` (a trainer unless `kind` says otherwise), imported under its dotted name
    (fewstep/families/t2i/t2i_trainer.py -> fewstep.families.t2i.t2i_trainer) so that it is the module the rest of the code imports. Python
    may import the package from another copy than the one the command names (a project whose PYTHONPATH points
    at a checkout); that is accepted only when the two files are byte-identical, so the code that runs is the
    code the stage's deps hash. One line otherwise."""
    flag, what, api, expected = kind
    file = Path(path).resolve()
    top = next((p for p in file.parents if (p / "fewstep" / "__init__.py").is_file()), None)
    name = ".".join(file.relative_to(top).with_suffix("").parts) if top is not None else ""
    module = None
    if file.is_file() and file.suffix == ".py" and name.startswith("fewstep."):
        try:
            module = pkgutil.resolve_name(name)
        except ImportError:
            module = None
    if module is None or not all(hasattr(module, attr) for attr in api):
        sys.exit(f"{flag} {path}: not a fewstep {what} module (expected {expected}: a module with {', '.join(api)})")
    imported = Path(module.__file__).resolve()
    if imported != file and imported.read_bytes() != file.read_bytes():
        sys.exit(f"{flag} {path}: Python imports {name} from {imported}, which differs from the named file "
                 f"(put the named file's project first on PYTHONPATH)")
    return module


def run_stage(stage: str, main: Callable, configure: Callable[[argparse.ArgumentParser], None],
              kind: ModuleKind = TRAINER) -> None:
    """Start a shared stage: read the family module's flag, add the module's inputs to the stage's arguments,
    and let the module's start-up run `main(params, args, device, module)`."""
    flag = kind.flag
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument(flag, type=Path, required=True, dest="module")
    module = load_module(first.parse_known_args()[0].module, kind)

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(flag, type=Path, required=True, help=f"the model family's {kind.what} module ({kind.expected})")
        for name, help in module.INPUTS.items():
            parser.add_argument(f"--{name}", type=Path, required=True, help=help)
        configure(parser)

    module.launch(stage, lambda params, args, device: main(params, args, device, module), arguments)


def train(trainer, stage: str, params, settings, args, device: torch.device, **continued) -> None:
    """One training stage (critic, distill, finetune) with the family's trainer on `settings` (the stage's
    params section): the stage's own random stream, the run's autocast; rank 0 writes `args.out`."""
    with parallel.output(args.out) as out:
        trainer.train_stage(params, settings, args, stage=stage, out=out, device=device,
                            generator=runtime.seeded(params.seed, stage),
                            autocast=runtime.autocast_factory(params, device), **continued)
