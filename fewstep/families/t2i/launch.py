"""Start-up of the SD stage scripts. Their commands run in the pipeline's own folder (`python
../../stages/t2i/encode.py --out encode`), which is what lets one dvc.yaml serve every SD pipeline
(pipelines/sd15/dvc.yaml is a link to pipelines/sdxl/dvc.yaml): nothing in it names the folder. Paths in
params.yaml stay relative to the repository root, so a stage makes its path arguments root-relative and
continues there."""
from __future__ import annotations

import os
from pathlib import Path

from fewstep.core import runtime
from fewstep.params import TEXT_TO_IMAGE


def run(stage: str, main, configure) -> None:
    """runtime.run for the text-to-image families, `main` running from the repository root (the folder above
    fewstep/)."""
    root = next(folder for folder in Path(__file__).resolve().parents if (folder / "fewstep" / "__init__.py").is_file())

    def from_root(params, args, device):
        for name, value in vars(args).items():
            if isinstance(value, Path):
                setattr(args, name, Path(os.path.relpath(value.absolute(), root)))
        args.params = os.path.relpath(Path(args.params).absolute(), root)  # its folder names the pipeline
        os.chdir(root)
        main(params, args, device)

    runtime.run(stage, from_root, configure, families=TEXT_TO_IMAGE)
